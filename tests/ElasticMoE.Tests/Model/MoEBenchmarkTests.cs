using ElasticMoE.Benchmarks;
using ElasticMoE.Data;

namespace ElasticMoE.Tests.Model;

public class MoEBenchmarkTests
{
    [Fact]
    public void Throughput_times_every_model_in_every_round_and_the_dense_baseline_has_the_moe_active_width()
    {
        var cfg = TestSupport.SmallConfig(("train.global-batch", "2"), ("train.micro-batch", "2"));
        var corpus = TextCorpus.Default(cfg.Data.ValidationFraction, cfg.Model.Context);
        var rounds = MoEBenchmarks.Throughput(cfg, corpus, rounds: 2, steps: 3, warmup: 1);
        Assert.Equal(2, rounds.Count);
        foreach (var round in rounds)
        {
            Assert.Equal(Enum.GetValues<MoEBenchmarks.Mode>().Order(), round.TokensPerSecond.Keys.Order());
            Assert.All(round.TokensPerSecond.Values, tps => Assert.True(double.IsFinite(tps) && tps > 0, $"{tps}"));
        }
        var dense = MoEBenchmarks.DenseEquivalent(cfg).Model;
        Assert.Equal(dense.Layers, dense.DenseLayers);
        Assert.Equal(cfg.Model.MoE.ExpertHidden * (cfg.Model.MoE.SharedExperts + cfg.Model.MoE.TopK), dense.DenseHidden);
    }
}
