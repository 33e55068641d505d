namespace ElasticMoE.Planning;

/// <summary>
/// DeepSeek's expert-parallel load balancer (EPLB, github.com/deepseek-ai/EPLB, <c>eplb.py</c>), global policy, as the
/// baseline <see cref="RebalancePlanner"/> is measured against. It fills every slot: W × slots physical experts per layer.
/// <list type="number">
/// <item><c>replicate_experts</c>: each expert starts with one replica; each further replica goes to the expert with the
/// highest load per replica (the first such expert on a tie, as <c>torch.max</c> does).</item>
/// <item><c>balanced_packing</c>: replicas, each carrying its expert's load over its replica count, sorted by that load
/// descending (stable, so ties keep replica order), each to the lightest worker that still has a free slot (the first
/// on a tie, as Python's <c>min</c> does); every worker ends with exactly <c>slots</c> replicas.</item>
/// </list>
/// Pack i is the i-th worker by <see cref="WorkerId"/>. EPLB recomputes from scratch and has no notion of today's
/// placement, which is why its churn is high. The hierarchical policy (expert groups packed to nodes first, then
/// replicated within a node) needs DeepSeek-V3's expert groups, which this model does not have; with one group and
/// one node it is the global policy.
/// </summary>
public static class EplbPlanner
{
    /// <summary>EPLB's placement of <paramref name="loads"/> ([layer][expert]) on <paramref name="workers"/> with <paramref name="slots"/> per worker.</summary>
    /// <exception cref="ArgumentException">Malformed loads, no workers, fewer slots than experts.</exception>
    public static EplbPlacement Plan(IReadOnlyList<IReadOnlyList<double>> loads, IReadOnlyList<WorkerId> workers, int slots)
    {
        var sorted = RebalancePlanner.Check(loads, workers, slots, today: null);
        return new EplbPlacement(sorted, loads.Select(layer => Pack(layer, sorted.Length, slots)).ToArray());
    }

    /// <summary>[expert] → the pack (worker index) of each of its replicas, in replica order.</summary>
    private static int[][] Pack(IReadOnlyList<double> load, int workers, int slots)
    {
        int experts = load.Count, physical = workers * slots;
        // replicate_experts: phy2log, with logcnt replicas per expert.
        var count = Enumerable.Repeat(1, experts).ToArray();
        var phy2log = Enumerable.Range(0, experts).ToList();
        for (int i = experts; i < physical; i++)
        {
            int hottest = 0;
            for (int e = 1; e < experts; e++)
                if (load[e] / count[e] > load[hottest] / count[hottest]) hottest = e;
            phy2log.Add(hottest);
            count[hottest]++;
        }
        var result = Enumerable.Range(0, experts).Select(_ => new List<int>()).ToArray();
        if (slots == 1)
        {
            // balanced_packing's shortcut for one item per pack: replica i to pack i, unsorted.
            for (int i = 0; i < physical; i++) result[phy2log[i]].Add(i);
            return result.Select(r => r.ToArray()).ToArray();
        }
        // balanced_packing of the replicas, each weighing its expert's load over its replica count.
        var weight = phy2log.Select(e => load[e] / count[e]).ToArray();
        var order = Enumerable.Range(0, physical).OrderByDescending(i => weight[i]).ToArray();
        var packWeight = new double[workers];
        var packItems = new int[workers];
        foreach (int i in order)
        {
            int pack = -1;
            for (int p = 0; p < workers; p++)
                if (packItems[p] < slots && (pack < 0 || packWeight[p] < packWeight[pack])) pack = p;
            packWeight[pack] += weight[i];
            packItems[pack]++;
            result[phy2log[i]].Add(pack);
        }
        return result.Select(r => r.ToArray()).ToArray();
    }
}

/// <summary>
/// EPLB's physical layout: [layer][expert] → the worker index (into <see cref="Workers"/>, ascending) of each replica.
/// </summary>
/// <remarks>
/// EPLB may pack two replicas of one expert onto one worker (on the P6 loads it does, 2 to 3 times a layer): that worker
/// then serves 2/r of the expert's tokens. Its own accounting (<see cref="MaxOverMean"/>) counts that; an
/// <see cref="ExpertPlacement"/> holds an expert at most once per worker and splits its tokens evenly over the copies,
/// so <see cref="Copies"/> makes the two one copy there, and balances worse than EPLB's own figure.
/// </remarks>
public sealed record EplbPlacement(IReadOnlyList<WorkerId> Workers, int[][][] Replicas)
{
    /// <summary>One copy of an expert wherever EPLB put one or more replicas of it: for churn, and to run it here.</summary>
    public ExpertPlacement Copies => new(Workers, Replicas.Select(layer => layer.Select(r => r.Distinct().Select(w => Workers[w]))));

    /// <summary>Replicas EPLB put on a worker that already had one of the same expert.</summary>
    public int MergedReplicas => Replicas.Sum(layer => layer.Sum(r => r.Length - r.Distinct().Count()));

    /// <summary>
    /// Max/mean as EPLB counts it (as <see cref="ExpertPlacement.MaxOverMean"/>, Σ busiest / Σ mean over layers), every
    /// replica carrying its expert's load over its replica count, two on one worker included.
    /// </summary>
    public double MaxOverMean(IReadOnlyList<IReadOnlyList<double>> loads)
    {
        double max = 0, mean = 0;
        for (int l = 0; l < Replicas.Length; l++)
        {
            var weight = new double[Workers.Count];
            for (int e = 0; e < Replicas[l].Length; e++)
                foreach (int w in Replicas[l][e]) weight[w] += loads[l][e] / Replicas[l][e].Length;
            max += weight.Max();
            mean += loads[l].Sum() / Workers.Count;
        }
        return mean > 0 ? max / mean : 1;
    }
}
