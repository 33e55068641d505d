using ElasticMoE.Data;
using ElasticMoE.Runtime.Benchmarks;

namespace ElasticMoE.Tests.Cluster;

/// <summary>The P1/P3 measurement itself (the figures are for `elasticmoe bench`, not for tests).</summary>
[Collection("cluster")]
public class ClusterBenchmarkTests
{
    [Theory]
    [InlineData(ClusterBenchmarks.Mode.SingleProcess)]
    [InlineData(ClusterBenchmarks.Mode.OneNode)]
    public async Task Measures_tokens_per_second_and_page_faults_per_step(ClusterBenchmarks.Mode mode)
    {
        var cfg = TestSupport.SmallConfig(("train.global-batch", "4"), ("train.micro-batch", "2"));
        var corpus = TextCorpus.Default(cfg.Data.ValidationFraction, cfg.Model.Context);
        // On a thread of its own: the 1-node mode serves the compute loop on the calling thread.
        var m = await Task.Factory.StartNew(() => ClusterBenchmarks.MeasureAsync(mode, cfg, corpus, steps: 4, warmup: 2),
            TaskCreationOptions.LongRunning).Unwrap().WaitAsync(TimeSpan.FromMinutes(2));
        Assert.True(m.TokensPerSecond > 0, $"{m.TokensPerSecond} tok/s");
        Assert.True(m.PageFaultsPerStep >= 0, $"{m.PageFaultsPerStep} faults per step");
    }

    [Fact]
    public void Reads_this_process_page_faults()
    {
        long before = ClusterBenchmarks.MinorFaults();
        var touched = new byte[64 << 20];
        for (int i = 0; i < touched.Length; i += 4096) touched[i] = 1;
        Assert.True(before > 0);
        Assert.True(ClusterBenchmarks.MinorFaults() - before >= 1000, "touching 64 MiB of fresh memory faults its pages in");
        GC.KeepAlive(touched);
    }

    [Fact]
    public async Task Refuses_too_few_steps()
    {
        var cfg = TestSupport.SmallConfig();
        var corpus = TextCorpus.Default(cfg.Data.ValidationFraction, cfg.Model.Context);
        await Assert.ThrowsAsync<ArgumentOutOfRangeException>(() => ClusterBenchmarks.MeasureAsync(ClusterBenchmarks.Mode.OneNode, cfg, corpus, steps: 1));
    }
}
