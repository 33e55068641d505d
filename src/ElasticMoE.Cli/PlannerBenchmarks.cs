using System.Globalization;
using ElasticMoE.Benchmarks;

namespace ElasticMoE.Cli;

/// <summary>
/// <c>bench --suite planners</c>: the elastic, transfer and rebalance planners alone (<see cref="PlannerScaleBenchmarks"/>)
/// at 64, 256 and 1,024 workers, 256 experts x 60 MoE layers: the coordinator-thread time of a re-plan and of a rebalance.
/// </summary>
internal static class PlannerBenchmarks
{
    public static readonly int[] WorldSizes = [64, 256, 1024];

    public static IEnumerable<BenchFigure> Run(TextWriter log)
    {
        if (Environment.GetEnvironmentVariable("ELASTICMOE_PLANNER_SIZES") is { Length: > 0 } sizes)   // e.g. "64,128" for a quick look
            return Run(log, sizes.Split(',').Select(x => int.Parse(x, CultureInfo.InvariantCulture)).ToArray());
        return Run(log, WorldSizes);
    }

    private static IEnumerable<BenchFigure> Run(TextWriter log, int[] worldSizes)
    {
        log.WriteLine("planners: 256 experts x 60 MoE layers, one stage; one call each (initial plan, lose 1 worker: plan + transfers, " +
                      "1 joins: plan + transfers, initial placement, one rebalance after ±10 % drift of Zipf loads) ...");
        log.WriteLine($"  {"workers",7} {"plan",8} {"shrink",8} {"xfer",8} {"grow",8} {"xfer",8} {"place",8} {"rebal",8}  (ms of thread CPU)  moves shrink/grow, copies moved");
        foreach (int w in worldSizes)
        {
            var f = PlannerScaleBenchmarks.Run(new PlannerScaleBenchmarks.Setup(w, 256, 60));
            log.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"  {w,7} {f.InitialPlanMs,8:F1} {f.ShrinkPlanMs,8:F1} {f.ShrinkTransferMs,8:F1} {f.GrowPlanMs,8:F1} {f.GrowTransferMs,8:F1} " +
                $"{f.InitialPlacementMs,8:F1} {f.RebalanceMs,8:F1}        {f.ShrinkMoves}/{f.GrowMoves}, {f.CopiesMoved} (max/mean {f.MaxOverMeanBefore:F3} -> {f.MaxOverMeanAfter:F3})"));
            yield return new($"elastic re-plan, lose 1 of {w} workers", f.ShrinkPlanMs, "ms");
            yield return new($"transfer plan, lose 1 of {w} workers", f.ShrinkTransferMs, "ms");
            yield return new($"elastic re-plan, 1 joins {w - 1} workers", f.GrowPlanMs, "ms");
            yield return new($"transfer plan, 1 joins {w - 1} workers", f.GrowTransferMs, "ms");
            yield return new($"rebalance plan, {w} workers", f.RebalanceMs, "ms");
        }
    }
}
