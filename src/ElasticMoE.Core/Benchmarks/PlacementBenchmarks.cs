using System.Diagnostics;
using ElasticMoE.Configuration;
using ElasticMoE.Planning;

namespace ElasticMoE.Benchmarks;

/// <summary>
/// P6: the expert placement planners alone, in one run on the same loads: static round-robin (where experts sit
/// today), DeepSeek's EPLB (<see cref="EplbPlanner"/>) and ours (<see cref="RebalancePlanner"/>).
/// </summary>
public static class PlacementBenchmarks
{
    /// <param name="Experts">Routed experts per MoE layer.</param>
    /// <param name="RedundantSlots"><c>rebalance.redundant-slots</c>: 2 on 64 experts × 8 workers is 25 % spare slots.</param>
    /// <param name="Layers">MoE layers, each with its own seeded order of hot experts (in a model they differ by layer).</param>
    /// <param name="Rebalances">Rebalances of the drift phase.</param>
    /// <param name="Drift">Between rebalances every expert's load is multiplied by a uniform factor in [1 − drift, 1 + drift]
    /// (a random walk: the loads wander, as a model's do while it trains).</param>
    /// <param name="ChurnBudget"><c>rebalance.churn-budget</c>, for ours.</param>
    public sealed record Setup(int Experts = 64, int Workers = 8, int RedundantSlots = 2, int Layers = 4, double ZipfS = 1.0,
        int Rebalances = 50, double Drift = 0.10, double ChurnBudget = 0.1, int Seed = 1)
    {
        public RebalanceOptions Options => RebalanceOptions.Default with { RedundantSlots = RedundantSlots, ChurnBudget = ChurnBudget };
        public int Slots => Options.SlotsPerWorker(Experts, Workers);
    }

    /// <summary>One policy's figures.</summary>
    /// <param name="ZipfMaxOverMean">Max/mean worker load of its placement of the Zipf loads, planned from nothing.</param>
    /// <param name="DriftMaxOverMean">Mean, over the drift rebalances, of max/mean right after each (on the loads it planned for).</param>
    /// <param name="DriftWorstMaxOverMean">The worst of those.</param>
    /// <param name="DriftBeforeMaxOverMean">Mean max/mean just before each rebalance: the last placement on the drifted loads.</param>
    /// <param name="MovedFraction">Mean fraction of the copies in place moved by a rebalance (new (layer, expert, worker) over all copies).</param>
    /// <param name="MaxMovedFraction">The most any one rebalance moved.</param>
    /// <param name="Copies">Copies of all layers in its last placement.</param>
    /// <param name="MsPerRebalance">Planner time per rebalance (all layers), mean over the drift phase.</param>
    public sealed record PolicyFigures(string Policy, double ZipfMaxOverMean, double DriftMaxOverMean, double DriftWorstMaxOverMean,
        double DriftBeforeMaxOverMean, double MovedFraction, double MaxMovedFraction, int Copies, double MsPerRebalance);

    /// <summary>Zipf(s) loads of one layer: the expert of rank k gets 1 / k^s, ranks in a seeded random order.</summary>
    public static double[] ZipfLoads(int experts, double s, Random rng)
    {
        var rank = Enumerable.Range(1, experts).OrderBy(_ => rng.Next()).ToArray();
        return rank.Select(k => 1 / Math.Pow(k, s)).ToArray();
    }

    /// <summary>The figures of every policy, on the same loads: static round-robin, EPLB as it counts itself, EPLB's
    /// placement run here (one copy per worker, tokens split evenly, see <see cref="EplbPlacement"/>), ours.</summary>
    public static IReadOnlyList<PolicyFigures> Run(Setup setup)
    {
        var (workers, zipf, drifted) = Loads(setup);
        var roundRobin = RoundRobin(setup, workers);
        EplbPlacement Eplb(double[][] loads) => EplbPlanner.Plan(loads, workers, setup.Slots);
        return
        [
            Measure("static round-robin", zipf, drifted, roundRobin, (_, today) => today, p => p, (p, loads) => p.MaxOverMean(loads)),
            Measure("EPLB, own count", zipf, drifted, Eplb(zipf), (loads, _) => Eplb(loads), p => p.Copies, (p, loads) => p.MaxOverMean(loads)),
            Measure("EPLB, run here", zipf, drifted, Eplb(zipf), (loads, _) => Eplb(loads), p => p.Copies, (p, loads) => p.Copies.MaxOverMean(loads)),
            Measure("ours", zipf, drifted, RebalancePlanner.Plan(zipf, workers, setup.Slots, null, 0).Placement,
                (loads, today) => Ours(setup, workers, loads, today).Placement, p => p, (p, loads) => p.MaxOverMean(loads)),
        ];
    }

    /// <summary>
    /// Ours from where a run starts, static round-robin, on the Zipf loads: max/mean and copies moved after each of
    /// <paramref name="rebalances"/> budgeted rebalances (the budget spreads a large re-placement over several).
    /// </summary>
    public static IReadOnlyList<RebalanceResult> FromRoundRobin(Setup setup, int rebalances)
    {
        var (workers, zipf, _) = Loads(setup);
        var today = RoundRobin(setup, workers);
        var result = new List<RebalanceResult>();
        for (int i = 0; i < rebalances; i++)
        {
            result.Add(Ours(setup, workers, zipf, today));
            today = result[^1].Placement;
        }
        return result;
    }

    private static RebalanceResult Ours(Setup setup, WorkerId[] workers, double[][] loads, ExpertPlacement today)
        => RebalancePlanner.Plan(loads, workers, setup.Slots, today, setup.Options.CopiesPerRebalance(today.TotalCopies));

    private static ExpertPlacement RoundRobin(Setup setup, WorkerId[] workers)
        => ExpertPlacement.FromOwners(LayoutPlanner.RoundRobin(setup.Layers, setup.Experts, setup.Workers), workers);

    /// <summary>The workers, the Zipf loads and the drifted loads after each rebalance, all from the setup's seed.</summary>
    private static (WorkerId[] Workers, double[][] Zipf, List<double[][]> Drifted) Loads(Setup setup)
    {
        var rng = new Random(setup.Seed);
        var workers = Enumerable.Range(0, setup.Workers).Select(i => new WorkerId($"node{i}", 1, 0)).ToArray();
        var zipf = Enumerable.Range(0, setup.Layers).Select(_ => ZipfLoads(setup.Experts, setup.ZipfS, rng)).ToArray();
        var drifted = new List<double[][]>();
        var current = zipf;
        for (int t = 0; t < setup.Rebalances; t++)
        {
            current = current.Select(layer => layer.Select(x => x * (1 + setup.Drift * (2 * rng.NextDouble() - 1))).ToArray()).ToArray();
            drifted.Add(current);
        }
        return (workers, zipf, drifted);
    }

    private static PolicyFigures Measure<T>(string policy, double[][] zipf, IReadOnlyList<double[][]> drifted, T initial,
        Func<double[][], T, T> rebalance, Func<T, ExpertPlacement> copies, Func<T, double[][], double> maxOverMean)
    {
        var today = initial;
        var after = new List<double>();
        var before = new List<double>();
        var moved = new List<double>();
        var clock = new Stopwatch();
        foreach (var loads in drifted)
        {
            before.Add(maxOverMean(today, loads));
            clock.Start();
            var next = rebalance(loads, today);
            clock.Stop();
            moved.Add((double)copies(next).CopiesMovedFrom(copies(today)) / copies(today).TotalCopies);
            after.Add(maxOverMean(next, loads));
            today = next;
        }
        return new PolicyFigures(policy, maxOverMean(initial, zipf), after.Average(), after.Max(), before.Average(), moved.Average(), moved.Max(),
            copies(today).TotalCopies, clock.Elapsed.TotalMilliseconds / drifted.Count);
    }
}
