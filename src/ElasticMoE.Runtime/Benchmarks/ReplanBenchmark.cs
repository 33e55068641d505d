using ElasticMoE.Configuration;
using ElasticMoE.Data;
using ElasticMoE.Model;
using ElasticMoE.Runtime.Actors;
using ElasticMoE.Runtime.Hosting;
using ElasticMoE.State;
using ElasticMoE.Training;

namespace ElasticMoE.Runtime.Benchmarks;

/// <summary>
/// What a re-plan costs a running job: the pause (last step of the old plan to first step of the new,
/// less one ordinary step of the same run) and the bytes moved, next to the bytes of the units that
/// changed hands. Three in-process nodes on loopback TCP walk through layouts that move every kind of unit.
/// </summary>
public static class ReplanBenchmark
{
    /// <summary>DP 3 → DP 2 (a worker's experts leave) → DP 3 (a whole slice arrives) → PP 3 → DP 1 → DP 3.</summary>
    public const string Schedule = "20=2x1,30=3x1,40=3x3,50=1x1,60=3x1";

    public sealed record PlanCost(int Epoch, long AtStep, string Layout, int UnitsMoved, long BytesMoved, long UnitBytes, double InstallSeconds, double PauseSeconds);

    public sealed record Result(IReadOnlyList<PlanCost> Plans, double MedianStepSeconds, IReadOnlyDictionary<UnitKind, long> UnitBytesByKind);

    public static Result Run(ElasticMoEConfig config, TextCorpus corpus, TextWriter? log = null)
    {
        int perNode = Math.Max(1, (config.Threads > 0 ? config.Threads : Environment.ProcessorCount) / 3);
        var run = config with
        {
            Threads = perNode,
            Train = config.Train with { Steps = 70, EvalEvery = 1_000_000, TimeLimitSeconds = 0 },
            Cluster = config.Cluster with { Nodes = 3, ExpectedNodes = 0, PipelineStages = 1, Relayout = Schedule },
        };
        using var report = new TrainingReport(TextWriter.Null, null);
        var result = LocalCluster.Run(run, corpus, report);
        var sizes = UnitSizes(run);
        // Ordinary steps: not the first of the run (warm-up) and not the first of any plan.
        var firsts = result.Plans.Select(p => p.AtStep).ToHashSet();
        var ordinary = result.Steps.Where(s => s.Step >= 5 && !firsts.Contains(s.Step)).Select(s => s.Seconds).Order().ToList();
        double median = ordinary[ordinary.Count / 2];
        var plans = result.Plans.Skip(1).Select(p => new PlanCost(p.Epoch, p.AtStep, $"{p.Dp}x{p.Pp}", p.UnitsMoved, p.BytesMoved,
            p.MovedUnits.Sum(u => sizes[u]), p.InstallSeconds, p.GapSeconds - median)).ToList();
        foreach (var p in plans)
            log?.WriteLine($"  plan {p.Epoch} at step {p.AtStep} ({p.Layout}): {p.UnitsMoved} units, {p.BytesMoved / 1024.0:F0} KiB moved " +
                           $"({p.UnitBytes / 1024.0:F0} KiB of unit state), install {p.InstallSeconds * 1000:F1} ms, pause {p.PauseSeconds * 1000:F1} ms");
        var byKind = sizes.GroupBy(kv => kv.Key.Kind).ToDictionary(g => g.Key, g => g.Max(kv => kv.Value));
        return new Result(plans, median, byKind);
    }

    /// <summary>
    /// Bytes of each unit's state after a first update: values plus both AdamW moments for parameters
    /// (buffers such as the router bias have no moments).
    /// </summary>
    public static IReadOnlyDictionary<UnitId, long> UnitSizes(ElasticMoEConfig config)
    {
        using var model = new MoETransformer(config.Model, config.Seed, TorchSharp.torch.CPU);
        var units = UnitBinding.Bind(model);
        try
        {
            return units.ToDictionary(kv => kv.Key,
                kv => kv.Value.Tensors.Sum(t => t.Value.numel() * t.Value.element_size() * (t.IsParameter ? 3 : 1)));
        }
        finally
        {
            foreach (var u in units.Values) u.Dispose();
        }
    }
}
