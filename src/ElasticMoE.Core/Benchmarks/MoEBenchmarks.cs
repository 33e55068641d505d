using System.Diagnostics;
using ElasticMoE.Configuration;
using ElasticMoE.Data;
using ElasticMoE.Model;
using ElasticMoE.Training;
using static TorchSharp.torch;

namespace ElasticMoE.Benchmarks;

/// <summary>
/// Is the MoE worth it: its training tokens/s against a dense model of the same active FFN width, and
/// the routed experts' time per layer with each kernel (chunked, the CPU default; the bmm kernels) against the
/// per-expert loop.
/// Every figure is a ratio of two measurements of the same run, taken in alternating rounds.
/// </summary>
public static class MoEBenchmarks
{
    /// <summary>
    /// The dense model of equal active compute: every block dense, of the width a token sees in an MoE
    /// block (shared plus top-k experts). For the default model: dense-layers = 4, dense-hidden = 288.
    /// </summary>
    public static ElasticMoEConfig DenseEquivalent(ElasticMoEConfig c) =>
        c with { Model = c.Model with { DenseLayers = c.Model.Layers, DenseHidden = c.Model.MoE.ExpertHidden * (c.Model.MoE.SharedExperts + c.Model.MoE.TopK) } };

    public enum Mode { MoE, MoELoop, Dense }

    /// <summary>Timed steps of one model in a row in <see cref="Throughput"/> (after one untimed step).</summary>
    public const int Block = 10;

    public sealed record ThroughputRound(IReadOnlyDictionary<Mode, double> TokensPerSecond);

    /// <summary>
    /// The three models trained side by side in blocks of <see cref="Block"/> steps (the order rotating every
    /// block), after <paramref name="warmup"/> untimed steps each: <paramref name="rounds"/> rounds of
    /// <paramref name="steps"/> steps per model, each round's figure a model's median step, the first step of
    /// every block left out.
    /// </summary>
    /// <remarks>
    /// <para>Blocks of a few steps, not whole rounds of one model: on a shared VM the machine's speed drifts by
    /// ±10 % over seconds, and rounds that timed one model for two seconds and then the other put that drift into
    /// the ratio (rounds of one run ranged 0.72–1.00); blocks of ten steps (about a second) see the same machine.</para>
    /// <para>Not one step of each in turn either: then every step starts with the caches holding another model's
    /// weights and moments, which no training process sees, and the MoE has 1.9 times the dense model's
    /// parameters (medians of MoE ÷ dense 0.87–0.88 step by step; 0.88–0.91 in blocks; the same build in processes
    /// of their own, 240 s each: 0.93–0.97 over stretches of the run). The first step of each block is the one
    /// that refills the caches; it is left out.</para>
    /// </remarks>
    public static IReadOnlyList<ThroughputRound> Throughput(ElasticMoEConfig config, TextCorpus corpus, int rounds, int steps, int warmup = 5, TextWriter? log = null)
    {
        var modes = Enum.GetValues<Mode>();
        var trainers = new Dictionary<Mode, Trainer>();
        try
        {
            foreach (var mode in modes)
            {
                var trainer = new Trainer(mode == Mode.Dense ? DenseEquivalent(config) : config, corpus);
                trainers[mode] = trainer;
                foreach (var layer in trainer.Model.MoELayers) layer.Kernel = mode == Mode.MoELoop ? ExpertKernel.Loop : ExpertKernel.Chunked;
                for (int i = 0; i < warmup; i++) trainer.TrainStep();
            }
            var result = new List<ThroughputRound>();
            int turn = 0;
            for (int r = 0; r < rounds; r++)
            {
                var seconds = modes.ToDictionary(m => m, _ => new List<double>(steps));
                while (seconds.Values.Any(l => l.Count < steps))
                {
                    for (int i = 0; i < modes.Length; i++)
                    {
                        var mode = modes[(i + turn) % modes.Length];
                        for (int s = 0; s <= Block; s++)
                        {
                            var sw = Stopwatch.StartNew();
                            trainers[mode].TrainStep();
                            if (s > 0 && seconds[mode].Count < steps) seconds[mode].Add(sw.Elapsed.TotalSeconds);
                        }
                    }
                    turn++;
                }
                // The median step, not the mean: a step now and then stalls behind another process.
                var tps = modes.ToDictionary(m => m, m => trainers[m].TokensPerStep / Median(seconds[m]));
                log?.WriteLine($"  round {r + 1}: {string.Join(", ", modes.Select(m => $"{m} {tps[m]:F0}"))} tok/s; MoE/dense {tps[Mode.MoE] / tps[Mode.Dense]:F3}, loop-MoE/dense {tps[Mode.MoELoop] / tps[Mode.Dense]:F3}");
                result.Add(new ThroughputRound(tps));
            }
            return result;
        }
        finally
        {
            foreach (var t in trainers.Values) t.Dispose();
        }
    }

    /// <summary>A point of a model's validation curve: after <paramref name="TrainSeconds"/> of its own training time, at <paramref name="Step"/>.</summary>
    public sealed record RacePoint(double TrainSeconds, long Step, double ValidationLoss);

    /// <param name="First">the first model's validation curve (the MoE's in <see cref="Race(ElasticMoEConfig, TextCorpus, double, TextWriter?)"/>),
    /// one point every <c>train.eval-every</c> steps and one at the end.</param>
    /// <param name="Second">the second model's (the dense model's).</param>
    public sealed record RaceResult(IReadOnlyList<RacePoint> First, IReadOnlyList<RacePoint> Second)
    {
        /// <summary>The first model's step times in seconds, in order (for a median that a stall behind another process does not move).</summary>
        public IReadOnlyList<double> FirstStepSeconds { get; init; } = [];
        /// <summary>The second model's.</summary>
        public IReadOnlyList<double> SecondStepSeconds { get; init; } = [];
    }

    /// <summary>Steps of one model in a row in <see cref="Race"/>.</summary>
    public const int RaceBlock = 25;

    /// <summary>
    /// The point of an MoE, at equal wall time: the MoE and the dense model of equal active width trained side by
    /// side in one process, blocks of <see cref="RaceBlock"/> steps in turn, each until it has spent
    /// <paramref name="seconds"/> of its own training time; the validation loss of each every <c>train.eval-every</c>
    /// steps (evaluation not counted as training time).
    /// </summary>
    /// <remarks>
    /// <para>Why side by side and not one process after the other (<c>bench/moe-vs-dense.sh</c>): on the 2-core VM the
    /// machine's speed wanders by ±20 % over minutes, so in two runs of 240 s one after the other the dense model's
    /// median step ranged 101–122 ms over stretches of its run and the MoE's 107–137: each curve took the machine's
    /// mood of its own four minutes. In blocks of ~3 s both see the same machine. Not shorter blocks: every switch
    /// refills the caches with the other model's weights, a cost a training process never pays (a 25-step block
    /// makes it one step in 25).</para>
    /// <para>Both models are warmed up first (a few steps of throwaway trainers), so the code they share is compiled
    /// before either is timed, and neither pays the other's start-up.</para>
    /// </remarks>
    public static RaceResult Race(ElasticMoEConfig config, TextCorpus corpus, double seconds, TextWriter? log = null)
        => Race(config, DenseEquivalent(config), corpus, seconds, log, ("MoE", "dense"));

    /// <summary>
    /// Any two models raced as <see cref="Race(ElasticMoEConfig, TextCorpus, double, TextWriter?)"/> races the MoE and the
    /// dense model: side by side in one process, blocks of <see cref="RaceBlock"/> steps in turn, each for
    /// <paramref name="seconds"/> of its own training time. <paramref name="names"/> label the progress lines.
    /// </summary>
    public static RaceResult Race(ElasticMoEConfig first, ElasticMoEConfig second, TextCorpus corpus, double seconds, TextWriter? log,
        (string First, string Second) names)
    {
        var config = first;
        var configs = new[] { first, second };
        foreach (var c in configs)
        {
            using var warm = new Trainer(c, corpus);
            for (int i = 0; i < 3; i++) warm.TrainStep();
            warm.Evaluate();
        }
        var trainers = new List<Trainer>();
        try
        {
            foreach (var c in configs) trainers.Add(new Trainer(c, corpus));
            var spent = new double[2];
            var curves = new[] { new List<RacePoint>(), new List<RacePoint>() };
            var stepSeconds = new[] { new List<double>(), new List<double>() };
            int every = Math.Max(1, config.Train.EvalEvery), turn = 0;
            double nextReport = seconds / 6;
            while (spent[0] < seconds || spent[1] < seconds)
            {
                for (int i = 0; i < 2; i++)
                {
                    int m = (i + turn) % 2;
                    var trainer = trainers[m];
                    for (int s = 0; s < RaceBlock && spent[m] < seconds; s++)
                    {
                        double took = trainer.TrainStep().Seconds;
                        spent[m] += took;
                        stepSeconds[m].Add(took);
                        if (trainer.Step % every == 0 || spent[m] >= seconds)
                            curves[m].Add(new RacePoint(spent[m], trainer.Step, trainer.Evaluate()));
                    }
                }
                turn++;
                if (log is not null && spent.Min() >= nextReport)
                {
                    log.WriteLine(string.Create(System.Globalization.CultureInfo.InvariantCulture,
                        $"  {nextReport,5:F0} s: {names.First} step {trainers[0].Step}, {names.Second} step {trainers[1].Step}"));
                    while (nextReport <= spent.Min()) nextReport += seconds / 6;
                }
            }
            return new RaceResult(curves[0], curves[1]) { FirstStepSeconds = stepSeconds[0], SecondStepSeconds = stepSeconds[1] };
        }
        finally
        {
            foreach (var t in trainers) t.Dispose();
        }
    }

    /// <summary>The last point of <paramref name="curve"/> at or before <paramref name="seconds"/> of training, or null.</summary>
    public static RacePoint? At(IReadOnlyList<RacePoint> curve, double seconds) => curve.LastOrDefault(p => p.TrainSeconds <= seconds);

    /// <param name="Layer">block index of the MoE layer.</param>
    /// <param name="Rows">token-expert assignments it ran (one micro-batch × top-k).</param>
    /// <param name="Capacity">the largest count of one expert: the grouped kernel's padded length.</param>
    /// <param name="LoopMs">forward + backward of the routed experts, per-expert loop (the fastest call: others only add interference).</param>
    /// <param name="PaddedMs">the same, every expert in one bmm padded to the largest count.</param>
    /// <param name="GroupedMs">the same with the grouped kernel (cost-planned groups, the accelerator kernel).</param>
    /// <param name="Groups">the grouped kernel's groups, as experts per group.</param>
    /// <param name="ChunkedMs">the same with the chunked CPU kernel (the default on a CPU).</param>
    public sealed record LayerTiming(int Layer, long Rows, long Capacity, double LoopMs, double PaddedMs, double GroupedMs, double ChunkedMs, string Groups);

    /// <summary>
    /// Per MoE layer of the configured model: the routed experts' forward and backward on the rows that
    /// layer dispatched for one training micro-batch (after <paramref name="warmupSteps"/> training steps,
    /// so the routing is a trained one), the loop against each kernel in alternating rounds.
    /// </summary>
    public static IReadOnlyList<LayerTiming> ExpertTime(ElasticMoEConfig config, TextCorpus corpus, int rounds = 7, int repeats = 10, int warmupSteps = 5)
    {
        using var trainer = new Trainer(config, corpus);
        for (int i = 0; i < warmupSteps; i++) trainer.TrainStep();
        var layers = trainer.Model.MoELayers.ToList();
        var recorder = new RecordingExecutor();
        foreach (var l in layers) l.Executor = recorder;
        using (no_grad())
        using (NewDisposeScope())
        {
            var (x, _) = trainer.Sampler.TrainBatch(trainer.Step, 0, config.Train.MicroBatch, trainer.Device);
            trainer.Model.forward(x);
        }
        foreach (var l in layers) l.Executor = LocalExpertExecutor.Instance;
        trainer.Model.TakeExpertCounts();

        var timings = new List<LayerTiming>();
        foreach (var layer in layers)
        {
            var (rows, counts) = recorder.Inputs[layer];
            var all = layer.AllExperts;
            using var weights = randn_like(rows);
            double Time(ExpertKernel kernel)
            {
                layer.Kernel = kernel;
                double best = double.MaxValue;
                for (int i = 0; i < repeats; i++)
                {
                    using var scope = NewDisposeScope();
                    var sw = Stopwatch.StartNew();
                    var x = rows.detach().requires_grad_(true);
                    var y = layer.RunExperts(all, x, counts);
                    y.mul(weights).sum().backward();
                    best = Math.Min(best, sw.Elapsed.TotalMilliseconds);
                }
                return best;
            }
            var kernels = new[] { ExpertKernel.Loop, ExpertKernel.Padded, ExpertKernel.Grouped, ExpertKernel.Chunked };
            var best = kernels.ToDictionary(k => k, _ => double.MaxValue);
            foreach (var k in kernels) Time(k);
            for (int r = 0; r < rounds; r++)
                for (int i = 0; i < kernels.Length; i++)
                {
                    var k = kernels[(i + r) % kernels.Length];
                    best[k] = Math.Min(best[k], Time(k));
                }
            layer.Kernel = ExpertKernel.Chunked;
            layer.zero_grad();
            var groups = MoELayer.PlanGroups(counts.Where(c => c > 0).ToArray(), rows.device.type == TorchSharp.DeviceType.CUDA);
            timings.Add(new LayerTiming(layer.LayerIndex, rows.shape[0], counts.Max(), best[ExpertKernel.Loop], best[ExpertKernel.Padded], best[ExpertKernel.Grouped], best[ExpertKernel.Chunked],
                                        string.Join("+", groups.Select(g => g.To - g.From))));
            rows.Dispose();
        }
        return timings;
    }

    public static double Median(IReadOnlyList<double> xs) => xs.Order().ElementAt(xs.Count / 2);

    // Keeps a copy of what each layer sends its routed experts, then runs them locally.
    private sealed class RecordingExecutor : IExpertExecutor
    {
        public Dictionary<MoELayer, (Tensor Rows, long[] Counts)> Inputs { get; } = [];

        public Tensor Run(MoELayer layer, Tensor tokens, long[] counts)
        {
            // Out of every scope of the forward: the benchmark disposes it when done with the layer.
            var copy = tokens.detach().clone().DetachFromDisposeScope();
            Inputs[layer] = (copy, (long[])counts.Clone());
            return LocalExpertExecutor.Instance.Run(layer, tokens, counts);
        }
    }
}
