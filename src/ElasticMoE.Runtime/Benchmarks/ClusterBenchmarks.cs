using ElasticMoE.Configuration;
using ElasticMoE.Data;
using ElasticMoE.Runtime.Hosting;
using ElasticMoE.Training;

namespace ElasticMoE.Runtime.Benchmarks;

/// <summary>
/// Cluster overheads, each against a baseline measured in the same process and run: the actor runtime
/// on one node against the bare training loop (P1), and two nodes against one (P3).
/// </summary>
public static class ClusterBenchmarks
{
    public sealed record Figures(double SingleProcess, double OneNode, double TwoNodes)
    {
        /// <summary>P1: 1-node ElasticMoE tokens/s ÷ the single-process loop.</summary>
        public double P1 => OneNode / SingleProcess;
        /// <summary>P3: 2 nodes ÷ 1 node tokens/s.</summary>
        public double P3 => TwoNodes / OneNode;
    }

    /// <summary>The ways of running the same steps that P1 and P3 compare.</summary>
    public enum Mode { SingleProcess, OneNode, TwoNodes }

    /// <summary>
    /// Tokens/s of one mode over <paramref name="steps"/> steps after <paramref name="warmup"/> untimed
    /// ones. Each mode should run in a process of its own: libgomp slows every OpenMP team once a
    /// process holds several, so measuring two modes in one process would charge one for the other.
    /// </summary>
    public static async Task<double> MeasureAsync(Mode mode, ElasticMoEConfig config, TextCorpus corpus, int steps = 30, int warmup = 20)
    {
        var timed = config with
        {
            Train = config.Train with { Steps = warmup + steps, EvalEvery = 1_000_000, TimeLimitSeconds = 0 },
        };
        // Two workers on this box share its cores: one libtorch thread each, as a real deployment on
        // one machine would configure them.
        int perNode = Math.Max(1, (config.Threads > 0 ? config.Threads : Environment.ProcessorCount) / 2);
        return mode switch
        {
            Mode.SingleProcess => SingleProcess(timed, corpus, warmup),
            Mode.OneNode => await ClusterAsync(timed with { Cluster = timed.Cluster with { Nodes = 1, ExpectedNodes = 0 } }, corpus, warmup).ConfigureAwait(false),
            _ => await ClusterAsync(timed with { Threads = perNode, Cluster = timed.Cluster with { Nodes = 2, ExpectedNodes = 0 } }, corpus, warmup).ConfigureAwait(false),
        };
    }

    private static double SingleProcess(ElasticMoEConfig config, TextCorpus corpus, int warmup)
    {
        using var trainer = new Trainer(config, corpus);
        var results = Enumerable.Range(0, config.Train.Steps).Select(_ => trainer.TrainStep()).ToList();
        return Rate(results.Skip(warmup));
    }

    private static async Task<double> ClusterAsync(ElasticMoEConfig config, TextCorpus corpus, int warmup)
    {
        using var report = new TrainingReport(TextWriter.Null, null);
        // As `elasticmoe train` runs it: the first worker computes on this (main) thread.
        var result = await Task.FromResult(LocalCluster.Run(config, corpus, report)).ConfigureAwait(false);
        return Rate(result.Steps.Skip(warmup));
    }

    private static double Rate(IEnumerable<StepResult> steps)
    {
        var list = steps.ToList();
        return list.Sum(s => s.Tokens) / list.Sum(s => s.Seconds);
    }
}
