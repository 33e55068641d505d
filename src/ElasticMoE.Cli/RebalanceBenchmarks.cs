using System.Globalization;
using ElasticMoE.Benchmarks;
using ElasticMoE.Configuration;
using ElasticMoE.Data;
using ElasticMoE.Planning;
using ElasticMoE.Runtime.Actors;
using ElasticMoE.Runtime.Hosting;
using ElasticMoE.Training;

namespace ElasticMoE.Cli;

/// <summary>
/// <c>bench --suite rebalance</c>, the real run: the configured model and data (e.g. Tiny Shakespeare with
/// <c>model.moe.bias-update-rate=0</c>, so loads stay skewed) on in-process clusters of 2 and 3 nodes, each
/// once without and once with <c>rebalance.every=10</c>, one after the other in this process. Per step, the
/// busiest worker's tokens (each expert's tokens shared evenly among its copies, summed over the MoE layers
/// and the copies a worker holds) and the worker max/mean load, read off the plan in force at that step, and
/// the step time; averaged over the steps after the first rebalance could have happened.
/// </summary>
internal static class RebalanceBenchmarks
{
    private sealed record Figures(double BusiestTokens, double MaxOverMean, double StepSeconds, int Rebalances);

    public static IEnumerable<BenchFigure> Run(ElasticMoEConfig config, TextCorpus corpus, int steps, TextWriter log)
    {
        int every = config.Rebalance.Every > 0 ? config.Rebalance.Every : 10;
        foreach (int nodes in new[] { 2, 3 })
        {
            var cluster = config.Cluster with { Nodes = nodes, ExpectedNodes = 0, PipelineStages = 1 };
            var plain = config with { Cluster = cluster, Rebalance = config.Rebalance with { Every = 0 }, Train = config.Train with { Steps = steps } };
            var rebalanced = plain with { Rebalance = config.Rebalance with { Every = every } };
            log.WriteLine($"rebalance: {steps} steps on {nodes} in-process nodes of {corpus.Name}, without and with rebalance.every={every} ...");
            var a = Measure(plain, corpus, every);
            var b = Measure(rebalanced, corpus, every);
            log.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"  {nodes} nodes: busiest worker {a.BusiestTokens:F0} -> {b.BusiestTokens:F0} tokens/step, max/mean {a.MaxOverMean:F3} -> {b.MaxOverMean:F3}, " +
                $"step {a.StepSeconds * 1000:F0} -> {b.StepSeconds * 1000:F0} ms, {b.Rebalances} rebalance(s)"));
            yield return new($"busiest worker tokens/step, {nodes} nodes, rebalanced", b.BusiestTokens, "tokens", "not rebalanced", a.BusiestTokens);
            yield return new($"worker max/mean load, {nodes} nodes, rebalanced", b.MaxOverMean, "ratio", "not rebalanced", a.MaxOverMean);
            yield return new($"step time, {nodes} nodes, rebalanced", b.StepSeconds * 1000, "ms", "not rebalanced", a.StepSeconds * 1000);
        }
    }

    private static Figures Measure(ElasticMoEConfig config, TextCorpus corpus, int from)
    {
        using var report = new TrainingReport(TextWriter.Null, null);
        var result = LocalCluster.RunAsync(config, corpus, report).GetAwaiter().GetResult();
        var plans = result.Plans.Where(p => p.Plan is not null).OrderBy(p => p.AtStep).ToList();
        var busiest = new List<double>();
        var ratio = new List<double>();
        foreach (var s in result.Steps.Where(s => s.Step >= from))
        {
            var plan = plans.Last(p => p.AtStep <= s.Step).Plan!;
            var load = new double[plan.WorldSize];
            for (int o = 0; o < s.ExpertCounts.Length; o++)
                for (int e = 0; e < s.ExpertCounts[o].Length; e++)
                {
                    var copies = plan.CopiesOf(o, e);
                    foreach (var r in copies) load[r] += (double)s.ExpertCounts[o][e] / copies.Length;
                }
            busiest.Add(load.Max());
            ratio.Add(load.Max() / load.Average());
        }
        var timed = result.Steps.Where(s => s.Step >= from).ToList();
        return new Figures(busiest.Average(), ratio.Average(), timed.Average(s => s.Seconds), Math.Max(0, plans.Count - 1));
    }
}
