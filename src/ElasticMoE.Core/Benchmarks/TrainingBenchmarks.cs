using System.Diagnostics;
using ElasticMoE.Configuration;
using ElasticMoE.Data;
using ElasticMoE.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace ElasticMoE.Benchmarks;

/// <summary>One figure of a benchmark run, with the baseline it is a ratio of when there is one.</summary>
public sealed record BenchFigure(string Name, double Value, string Unit, string? Baseline = null, double? BaselineValue = null)
{
    public double? Ratio => BaselineValue is > 0 ? Value / BaselineValue : null;
}

/// <summary>Single-process training figures: tokens/s, MFU against a GEMM peak measured in the same run, tensor leaks.</summary>
public static class TrainingBenchmarks
{
    /// <summary>Best fp32 matmul rate (FLOP/s) of square n×n products on this process's torch threads.</summary>
    public static double GemmPeak(int n = 1024, int repeats = 12)
    {
        Native.LibTorchLoader.EnsureLoaded();
        using var scope = NewDisposeScope();
        var a = randn(n, n);
        var b = randn(n, n);
        for (int i = 0; i < 3; i++) a.matmul(b).Dispose();
        double best = 0;
        for (int i = 0; i < repeats; i++)
        {
            var sw = Stopwatch.StartNew();
            using var c = a.matmul(b);
            _ = c.data<float>()[0];
            best = Math.Max(best, 2.0 * n * n * n / sw.Elapsed.TotalSeconds);
        }
        return best;
    }

    /// <summary>
    /// Model FLOPs per trained token (forward + backward): 6 per active weight (dense matrices, the shared
    /// experts and top-k routed experts, the head), plus attention scores and their mix of values,
    /// 6·L·T·heads·(qk + v) (MHA: qk = v = head-dim, so 12·L·T·d; MLA: qk = nope + rope). Embedding lookups are free.
    /// </summary>
    public static double FlopsPerToken(ModelOptions m)
    {
        double d = m.DModel;
        double attn = AttentionBenchmarks.AttentionParameters(m);
        double dense = 3 * d * m.DenseHidden;
        double moe = 3 * d * m.MoE.ExpertHidden * (m.MoE.SharedExperts + m.MoE.TopK) + d * m.MoE.RoutedExperts;
        double weights = m.Layers * attn + m.DenseLayers * dense + (m.Layers - m.DenseLayers) * moe + d * m.VocabSize;
        double scores = m.Attention == AttentionKind.Mla
            ? 6.0 * m.Layers * m.Context * m.Heads * (m.QkNopeHeadDim + m.QkRopeHeadDim + m.VHeadDim)
            : 12.0 * m.Layers * m.Context * d;
        return 6 * weights + scores;
    }

    public sealed record ThroughputResult(double TokensPerSecond, double ModelFlops, double GemmPeakFlops, double Mfu, double StepSeconds);

    /// <summary>Trains <paramref name="steps"/> timed steps (after warm-up) and relates the rate to the GEMM peak measured now.</summary>
    public static ThroughputResult Throughput(ElasticMoEConfig config, TextCorpus corpus, int steps = 30, int warmup = 5)
    {
        using var trainer = new Trainer(config, corpus);
        for (int i = 0; i < warmup; i++) trainer.TrainStep();
        var sw = Stopwatch.StartNew();
        for (int i = 0; i < steps; i++) trainer.TrainStep();
        double seconds = sw.Elapsed.TotalSeconds;
        double tps = steps * trainer.TokensPerStep / seconds;
        double flops = tps * FlopsPerToken(config.Model);
        double peak = GemmPeak();
        return new ThroughputResult(tps, flops, peak, flops / peak, seconds / steps);
    }

    public sealed record LeakResult(long LiveBefore, long LiveAfter, int Steps, long ProcessBytesBefore, long ProcessBytesAfter);

    /// <summary>Live TorchSharp tensors before and after <paramref name="steps"/> steps: a leak shows as growth.</summary>
    public static LeakResult TensorLeak(ElasticMoEConfig config, TextCorpus corpus, int steps = 200)
    {
        using var trainer = new Trainer(config, corpus);
        for (int i = 0; i < 3; i++) trainer.TrainStep();
        GC.Collect();
        long before = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
        long rssBefore = Process.GetCurrentProcess().WorkingSet64;
        for (int i = 0; i < steps; i++)
        {
            trainer.TrainStep();
            if ((i + 1) % trainer.Config.Train.EvalEvery == 0) trainer.Evaluate();
        }
        GC.Collect();
        return new LeakResult(before, DisposeScopeManager.Statistics.ThreadTotalLiveCount, steps, rssBefore, Process.GetCurrentProcess().WorkingSet64);
    }
}
