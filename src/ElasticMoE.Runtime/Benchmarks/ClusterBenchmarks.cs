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

    /// <param name="TokensPerSecond">Over the timed steps.</param>
    /// <param name="PageFaultsPerStep">
    /// Minor page faults of the process per timed step (NaN off Linux): memory a step touches fresh
    /// instead of reusing. The single-process loop is the baseline; a runtime that lets tensors outlive
    /// their step shows here long before it shows as a leak.
    /// </param>
    public sealed record Measurement(double TokensPerSecond, double PageFaultsPerStep);

    /// <summary>
    /// Tokens/s of one mode over <paramref name="steps"/> steps after <paramref name="warmup"/> untimed
    /// ones. Each mode should run in a process of its own: libgomp slows every OpenMP team once a
    /// process holds several, so measuring two modes in one process would charge one for the other.
    /// </summary>
    public static async Task<Measurement> MeasureAsync(Mode mode, ElasticMoEConfig config, TextCorpus corpus, int steps = 30, int warmup = 20)
    {
        if (warmup < 1 || steps < 2) throw new ArgumentOutOfRangeException(nameof(steps), "need at least 1 warm-up step and 2 timed steps");
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

    private static Measurement SingleProcess(ElasticMoEConfig config, TextCorpus corpus, int warmup)
    {
        using var trainer = new Trainer(config, corpus);
        var faults = new FaultWindow(warmup, config.Train.Steps);
        var results = Enumerable.Range(0, config.Train.Steps).Select(_ => faults.Observe(trainer.TrainStep())).ToList();
        return new(Rate(results.Skip(warmup)), faults.PerStep);
    }

    private static async Task<Measurement> ClusterAsync(ElasticMoEConfig config, TextCorpus corpus, int warmup)
    {
        using var report = new TrainingReport(TextWriter.Null, null);
        var faults = new FaultWindow(warmup, config.Train.Steps);
        report.StepReported += r => faults.Observe(r);
        // As `elasticmoe train` runs it: the first worker computes on this (main) thread.
        var result = await Task.FromResult(LocalCluster.Run(config, corpus, report)).ConfigureAwait(false);
        return new(Rate(result.Steps.Skip(warmup)), faults.PerStep);
    }

    private static double Rate(IEnumerable<StepResult> steps)
    {
        var list = steps.ToList();
        return list.Sum(s => s.Tokens) / list.Sum(s => s.Seconds);
    }

    /// <summary>
    /// Page faults from the end of the last warm-up step to the end of the second-to-last step: the last
    /// one is followed by a validation pass in the cluster's schedule, so it is left out of both modes.
    /// </summary>
    private sealed class FaultWindow(int warmup, int total)
    {
        private long _start = -1, _end = -1;

        public StepResult Observe(StepResult r)
        {
            if (r.Step == warmup - 1) _start = MinorFaults();
            if (r.Step == total - 2) _end = MinorFaults();
            return r;
        }

        public double PerStep => _start >= 0 && _end >= _start ? (double)(_end - _start) / (total - 1 - warmup) : double.NaN;
    }

    /// <summary>Minor page faults of this process so far (field 10 of /proc/self/stat), or -1 off Linux.</summary>
    public static long MinorFaults()
    {
        try
        {
            var stat = File.ReadAllText("/proc/self/stat");
            // The command name (field 2) is in parentheses and may contain spaces: count from after it.
            var fields = stat[(stat.LastIndexOf(')') + 2)..].Split(' ');
            return long.Parse(fields[7], System.Globalization.CultureInfo.InvariantCulture);   // field 10 = 3rd + 7
        }
        catch (Exception ex) when (ex is IOException or UnauthorizedAccessException or FormatException or IndexOutOfRangeException)
        {
            return -1;
        }
    }
}
