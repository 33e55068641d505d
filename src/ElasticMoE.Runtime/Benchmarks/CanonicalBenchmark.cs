using System.Diagnostics;
using System.Globalization;
using ElasticMoE.Configuration;
using ElasticMoE.Data;
using ElasticMoE.Runtime.Hosting;
using ElasticMoE.Training;

namespace ElasticMoE.Runtime.Benchmarks;

/// <summary>
/// <c>bench --suite canonical</c>: the canonical reduction's guarantee over a long run. The single-process loop
/// trains the configured model for N steps (default 1,000); then in-process clusters (real ActorSystems on
/// loopback TCP) at DP 1, 2, 3, 4, PP 2 and DP 2 × PP 2 train the same N steps, and every step's loss and
/// gradient norm is compared with the loop's bit for bit. A check more than a figure: the first step whose bits
/// differ is printed, and the suite fails.
/// </summary>
public static class CanonicalBenchmark
{
    /// <summary>The layouts checked: (nodes, pipeline stages).</summary>
    public static readonly (int Nodes, int Pp)[] Layouts = [(1, 1), (2, 1), (3, 1), (4, 1), (2, 2), (4, 2)];

    public sealed record LayoutResult(string Layout, int Steps, int IdenticalSteps, long? FirstDifferentStep, double MaxRelativeLossDiff, double Seconds);

    public static IReadOnlyList<LayoutResult> Run(ElasticMoEConfig config, TextCorpus corpus, int steps, TextWriter log, IEnumerable<(int Nodes, int Pp)>? layouts = null)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(steps, 1);
        // Validation is a forward of its own, not a sum this checks; it would only lengthen the runs.
        var run = config with
        {
            Train = config.Train with { Steps = steps, EvalEvery = 1_000_000, TimeLimitSeconds = 0 },
            Cluster = config.Cluster with { ExpectedNodes = 0, Relayout = "" },
        };
        var clock = Stopwatch.StartNew();
        var reference = new List<StepResult>(steps);
        using (var trainer = new Trainer(run, corpus))
            for (int i = 0; i < steps; i++) reference.Add(trainer.TrainStep());
        log.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"  single-process loop: {steps} steps in {clock.Elapsed.TotalSeconds:F0} s, loss {reference[0].Loss:F4} -> {reference[^1].Loss:F4}"));

        var results = new List<LayoutResult>();
        foreach (var (nodes, pp) in layouts ?? Layouts)
        {
            var cfg = run with { Cluster = run.Cluster with { Nodes = nodes, PipelineStages = pp } };
            string name = $"DP {nodes / pp} x PP {pp}";
            clock.Restart();
            using var report = new TrainingReport(TextWriter.Null, null);
            var got = LocalCluster.Run(cfg, corpus, report).Steps;
            int identical = 0;
            long? first = null;
            double worst = 0;
            for (int i = 0; i < Math.Min(got.Count, reference.Count); i++)
            {
                bool same = got[i].Loss.Equals(reference[i].Loss) && got[i].GradNorm.Equals(reference[i].GradNorm);
                if (same) identical++;
                else first ??= i + 1;
                worst = Math.Max(worst, Math.Abs(got[i].Loss - reference[i].Loss) / Math.Abs(reference[i].Loss));
            }
            if (got.Count != reference.Count) first ??= Math.Min(got.Count, reference.Count) + 1;
            var r = new LayoutResult(name, got.Count, identical, first, worst, clock.Elapsed.TotalSeconds);
            results.Add(r);
            log.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"  {name} ({nodes} in-process node(s)): {identical}/{steps} steps bit-identical (loss and gradient norm){(first is { } f ? $"; FIRST DIFFERENCE at step {f}, max relative loss difference {worst:E2}" : "")}; {r.Seconds:F0} s"));
        }
        return results;
    }
}
