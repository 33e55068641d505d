using System.Diagnostics;
using System.Runtime.InteropServices;
using ElasticMoE.Configuration;
using ElasticMoE.Planning;

namespace ElasticMoE.Benchmarks;

/// <summary>
/// The planners alone (pure code: no model, no cluster) at a world size: what a re-plan and a rebalance cost the
/// coordinator's thread. One run of each, on seeded inputs, plans mirrored on buddies (redundancy 1, so a lost worker loses
/// nothing): the initial plan, the plan after losing one worker and
/// its transfers (the lost worker's state gone), the plan after a newcomer joins and its transfers, the initial
/// expert placement and one budgeted rebalance after ±10 % drift of Zipf loads.
/// </summary>
public static class PlannerScaleBenchmarks
{
    /// <param name="Workers">World size (DP, one stage).</param>
    /// <param name="Experts">Routed experts per MoE layer.</param>
    /// <param name="MoELayers">MoE layers (the model has one dense layer more).</param>
    public sealed record Setup(int Workers = 1024, int Experts = 256, int MoELayers = 60, int Seed = 1)
    {
        public ModelOptions Model => ConfigLoader.Load(null, new Dictionary<string, string>
        {
            ["model.layers"] = (MoELayers + 1).ToString(System.Globalization.CultureInfo.InvariantCulture),
            ["model.dense-layers"] = "1",
            ["model.moe.routed-experts"] = Experts.ToString(System.Globalization.CultureInfo.InvariantCulture),
        }).Model;
    }

    /// <summary>Milliseconds of each planner call (this thread's CPU time, see <see cref="ThreadCpuMs"/>), and what it produced (to check the run did real work).</summary>
    public sealed record Figures(Setup Setup, double InitialPlanMs, double ShrinkPlanMs, double ShrinkTransferMs, int ShrinkMoves,
        double GrowPlanMs, double GrowTransferMs, int GrowMoves, double InitialPlacementMs, double RebalanceMs, int Copies, int CopiesMoved,
        double MaxOverMeanBefore, double MaxOverMeanAfter);

    public static Figures Run(Setup setup)
    {
        var model = setup.Model;
        int w = setup.Workers;
        // One spare worker beyond the plan: the newcomer of the grow step.
        var all = Enumerable.Range(0, w + 1).Select(i => new WorkerSlot(new WorkerId($"node{i:D5}", 1, 0), $"10.0.{i / 250}.{i % 250}:9000")).ToList();
        double mark = ThreadCpuMs();
        double Lap() { double now = ThreadCpuMs(), ms = now - mark; mark = now; return ms; }

        var first = ElasticPlanner.Next(null, all, w, 1, model, 0, redundancy: 1);
        double initialPlan = Lap();

        var lost = first.Workers[w / 2].Id;
        var survivors = all.Where(s => s.Id != lost).ToList();
        Lap();
        var shrunk = ElasticPlanner.Next(first, survivors.Take(w - 1).ToList(), w - 1, 1, model, 1, redundancy: 1);
        double shrinkPlan = Lap();
        var shrinkTransfer = TransferPlanner.Between(first, shrunk, model, [lost]);
        double shrinkTransferMs = Lap();

        var grown = ElasticPlanner.Next(shrunk, survivors, w, 1, model, 2, redundancy: 1);
        double growPlan = Lap();
        var growTransfer = TransferPlanner.Between(shrunk, grown, model);
        double growTransferMs = Lap();

        var rng = new Random(setup.Seed);
        var zipf = Enumerable.Range(0, setup.MoELayers).Select(_ => PlacementBenchmarks.ZipfLoads(setup.Experts, 1.0, rng)).ToArray();
        var drifted = zipf.Select(layer => layer.Select(x => x * (1 + 0.10 * (2 * rng.NextDouble() - 1))).ToArray()).ToArray();
        var ids = grown.Workers.Select(s => s.Id).ToArray();
        var options = RebalanceOptions.Default;
        int slots = options.SlotsPerWorker(setup.Experts, w);
        Lap();
        var initial = RebalancePlanner.Plan(zipf, ids, slots, null, 0);
        double initialPlacement = Lap();
        var rebalance = RebalancePlanner.Plan(drifted, ids, slots, initial.Placement, options.CopiesPerRebalance(initial.Placement.TotalCopies));
        double rebalanceMs = Lap();

        return new Figures(setup, initialPlan, shrinkPlan, shrinkTransferMs, shrinkTransfer.Moves.Count, growPlan, growTransferMs,
            growTransfer.Moves.Count, initialPlacement, rebalanceMs, rebalance.Placement.TotalCopies, rebalance.CopiesMoved,
            rebalance.MaxOverMeanBefore, rebalance.MaxOverMeanAfter);
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct TimeSpec { public long Seconds, Nanoseconds; }

    [DllImport("libc", EntryPoint = "clock_gettime")]
    private static extern int ClockGetTime(int clock, out TimeSpec time);

    /// <summary>
    /// CPU time of this thread in milliseconds: the planners run on one thread (the coordinator's), and on a box shared
    /// with other jobs the wall clock counts their time too. Wall clock where the thread clock is not available.
    /// </summary>
    public static double ThreadCpuMs()
    {
        const int ClockThreadCpuTimeId = 3;
        if (OperatingSystem.IsLinux() && ClockGetTime(ClockThreadCpuTimeId, out var t) == 0) return t.Seconds * 1e3 + t.Nanoseconds / 1e6;
        return Stopwatch.GetTimestamp() * 1000.0 / Stopwatch.Frequency;
    }
}
