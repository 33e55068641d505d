namespace ElasticMoE.Planning;

/// <summary>
/// A copy of expert <paramref name="Expert"/> of MoE layer <paramref name="Layer"/> that <paramref name="To"/> must receive,
/// sent by <paramref name="From"/>, a worker that held it before (every copy is bit-identical, so any will do): the first
/// such worker that is still in the new placement, else the first that held it (then it left, and its state has to
/// come from a mirror or a checkpoint).
/// </summary>
public sealed record ExpertCopyMove(int Layer, int Expert, WorkerId From, WorkerId To)
{
    public override string ToString() => $"layer {Layer} expert {Expert}: {From} -> {To}";
}

/// <summary>
/// Where the copies of every routed expert live: for each MoE layer ordinal and expert, the workers holding
/// a copy, at least one, each at most once, in ascending <see cref="WorkerId"/> order. A value: two placements
/// are equal when they put the same copies on the same workers.
/// </summary>
/// <remarks>
/// An expert with r copies has its tokens split into r equal parts, one per copy in the order of
/// <see cref="CopiesOf"/>: the split is deterministic (so the loss does not depend on it), and each copy
/// carries 1/r of the expert's load, which is how <see cref="WorkerLoads"/> counts it. The order is
/// canonical (by identity) rather than historical, so the same set of holders always splits the same way.
/// Workers that hold nothing still count: a placement is over <see cref="Workers"/>, and the mean load
/// divides by all of them.
/// </remarks>
public sealed record ExpertPlacement
{
    private readonly WorkerId[][][] holders;

    /// <param name="workers">Every worker the placement may use (any order; kept ascending).</param>
    /// <param name="holders">[layer][expert] → workers holding a copy (any order; kept ascending).</param>
    /// <exception cref="ArgumentException">An expert without a copy, a worker twice, a holder not among the workers.</exception>
    public ExpertPlacement(IEnumerable<WorkerId> workers, IEnumerable<IEnumerable<IEnumerable<WorkerId>>> holders)
    {
        Workers = workers.Order().ToArray();
        if (Workers.Distinct().Count() != Workers.Count) throw new ArgumentException("a worker appears more than once", nameof(workers));
        var known = Workers.ToHashSet();
        this.holders = holders.Select(layer => layer.Select(copies => copies.Order().ToArray()).ToArray()).ToArray();
        for (int l = 0; l < this.holders.Length; l++)
            for (int e = 0; e < this.holders[l].Length; e++)
            {
                var h = this.holders[l][e];
                if (h.Length == 0) throw new ArgumentException($"layer {l} expert {e} has no copy", nameof(holders));
                if (h.Distinct().Count() != h.Length) throw new ArgumentException($"layer {l} expert {e} has two copies on one worker", nameof(holders));
                if (h.FirstOrDefault(w => !known.Contains(w)) is { } stranger)
                    throw new ArgumentException($"layer {l} expert {e} is held by {stranger}, which is not among the workers", nameof(holders));
            }
    }

    /// <summary>One copy of every expert, on <c>ranks[owner[l][e]]</c>: a <see cref="TrainingPlan.ExpertOwner"/> table read by identity.</summary>
    public static ExpertPlacement FromOwners(int[][] owner, IReadOnlyList<WorkerId> ranks)
        => new(ranks, owner.Select(row => row.Select(rank => new[] { ranks[rank] })));

    /// <summary>The experts of a plan where its <see cref="TrainingPlan.CopiesOf"/> puts them (one copy each unless it replicates them).</summary>
    public static ExpertPlacement Of(TrainingPlan plan)
    {
        var ranks = plan.Workers.Select(w => w.Id).ToArray();
        return new(ranks, plan.ExpertOwner.Select((row, o) => row.Select((_, e) => plan.CopiesOf(o, e).Select(r => ranks[r]))));
    }

    /// <summary>Every worker of the placement, ascending, whether it holds anything or not.</summary>
    public IReadOnlyList<WorkerId> Workers { get; }

    public int Layers => holders.Length;

    public int ExpertCount(int layer) => holders[layer].Length;

    /// <summary>Workers holding a copy of the expert, ascending: copy i takes the i-th of r equal parts of its tokens.</summary>
    public IReadOnlyList<WorkerId> CopiesOf(int layer, int expert) => holders[layer][expert];

    /// <summary>Experts of the layer that <paramref name="worker"/> holds a copy of, ascending.</summary>
    public int[] ExpertsOf(int layer, WorkerId worker)
        => Enumerable.Range(0, holders[layer].Length).Where(e => Array.IndexOf(holders[layer][e], worker) >= 0).ToArray();

    /// <summary>Copies of all experts of all layers.</summary>
    public int TotalCopies => holders.Sum(layer => layer.Sum(h => h.Length));

    /// <summary>
    /// Load of every worker (ascending by identity) in one layer: each expert's load split evenly among its copies.
    /// </summary>
    public double[] WorkerLoads(int layer, IReadOnlyList<double> expertLoads)
    {
        if (expertLoads.Count != holders[layer].Length)
            throw new ArgumentException($"layer {layer} has {holders[layer].Length} experts, got {expertLoads.Count} loads", nameof(expertLoads));
        var index = Workers.Select((w, i) => (w, i)).ToDictionary(t => t.w, t => t.i);
        var load = new double[Workers.Count];
        for (int e = 0; e < holders[layer].Length; e++)
            foreach (var w in holders[layer][e]) load[index[w]] += expertLoads[e] / holders[layer][e].Length;
        return load;
    }

    /// <summary>The busiest worker's load in one layer.</summary>
    public double MaxLoad(int layer, IReadOnlyList<double> expertLoads) => WorkerLoads(layer, expertLoads).Max();

    /// <summary>The mean worker load in one layer: the layer's total over all workers, wherever the copies are.</summary>
    public double MeanLoad(int layer, IReadOnlyList<double> expertLoads) => expertLoads.Sum() / Workers.Count;

    /// <summary>
    /// Σ over layers of the busiest worker's load, over Σ of the mean loads (1 = perfect). MoE layers run one
    /// after the other and each waits for its busiest worker, so this is the step's expert time over the
    /// time a perfect balance would take. With one layer it is that layer's max/mean.
    /// </summary>
    public double MaxOverMean(IReadOnlyList<IReadOnlyList<double>> loads)
    {
        double max = 0, mean = 0;
        for (int l = 0; l < Layers; l++)
        {
            max += MaxLoad(l, loads[l]);
            mean += MeanLoad(l, loads[l]);
        }
        return mean > 0 ? max / mean : 1;
    }

    /// <summary>
    /// The copies this placement has that <paramref name="previous"/> did not: a (layer, expert, worker) that is new.
    /// Copies dropped cost nothing to move and are not listed. Ordered by layer, expert, receiver.
    /// </summary>
    /// <exception cref="ArgumentException">The placements are of different models.</exception>
    public IReadOnlyList<ExpertCopyMove> MovesFrom(ExpertPlacement previous)
    {
        RequireSameModel(previous);
        var moves = new List<ExpertCopyMove>();
        for (int l = 0; l < Layers; l++)
            for (int e = 0; e < holders[l].Length; e++)
            {
                var before = previous.holders[l][e];
                var from = before.FirstOrDefault(w => Workers.Contains(w)) ?? before[0];
                foreach (var w in holders[l][e])
                    if (Array.IndexOf(before, w) < 0) moves.Add(new(l, e, from, w));
            }
        return moves;
    }

    /// <summary>
    /// This placement plus the copies <paramref name="previous"/> had on workers that are still here, where such a
    /// worker has a free slot (fewer than <paramref name="slots"/> copies in the layer): what a membership re-plan
    /// keeps of a rebalance. The re-plan places one copy of each expert by its own rule; without this, every
    /// extra copy of a hot expert would be dropped at each join or loss and the load skewed until the next
    /// rebalance. A kept copy costs no transfer: its holder has it. Deterministic: by layer, expert, then holder.
    /// </summary>
    /// <exception cref="ArgumentException">The placements are of different models.</exception>
    public ExpertPlacement KeepingCopiesOf(ExpertPlacement previous, int slots)
    {
        RequireSameModel(previous);
        var here = Workers.ToHashSet();
        var result = holders.Select(layer => layer.Select(h => h.ToList()).ToArray()).ToArray();
        for (int l = 0; l < Layers; l++)
        {
            var used = Workers.ToDictionary(w => w, w => ExpertsOf(l, w).Length);
            for (int e = 0; e < result[l].Length; e++)
                foreach (var w in previous.holders[l][e])
                    if (here.Contains(w) && !result[l][e].Contains(w) && used[w] < slots)
                    {
                        result[l][e].Add(w);
                        used[w]++;
                    }
        }
        return new ExpertPlacement(Workers, result.Select(layer => layer.Select(h => (IEnumerable<WorkerId>)h)));
    }

    private void RequireSameModel(ExpertPlacement previous)
    {
        if (previous.Layers != Layers || Enumerable.Range(0, Layers).Any(l => previous.ExpertCount(l) != ExpertCount(l)))
            throw new ArgumentException("the placements are of different models (layers or experts differ)", nameof(previous));
    }

    /// <summary>How many copies <see cref="MovesFrom"/> lists: the churn of going from <paramref name="previous"/> to this.</summary>
    public int CopiesMovedFrom(ExpertPlacement previous) => MovesFrom(previous).Count;

    public bool Equals(ExpertPlacement? other)
        => other is not null && Workers.SequenceEqual(other.Workers) && holders.Length == other.holders.Length
           && holders.Zip(other.holders).All(t => t.First.Length == t.Second.Length && t.First.Zip(t.Second).All(c => c.First.SequenceEqual(c.Second)));

    public override int GetHashCode()
    {
        var h = new HashCode();
        foreach (var w in Workers) h.Add(w);
        foreach (var layer in holders)
            foreach (var copies in layer)
            {
                h.Add(copies.Length);
                foreach (var w in copies) h.Add(w);
            }
        return h.ToHashCode();
    }
}
