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

    [Fact]
    public void The_race_gives_each_model_its_training_time_and_a_validation_curve_that_is_the_plain_trainers()
    {
        var cfg = TestSupport.SmallConfig(("train.global-batch", "2"), ("train.micro-batch", "2"), ("train.eval-every", "4"), ("train.eval-batches", "1"));
        var corpus = TextCorpus.Default(cfg.Data.ValidationFraction, cfg.Model.Context);
        var race = MoEBenchmarks.Race(cfg, corpus, seconds: 1.5);
        foreach (var (curve, config) in new[] { (race.First, cfg), (race.Second, MoEBenchmarks.DenseEquivalent(cfg)) })
        {
            Assert.NotEmpty(curve);
            // Every eval-every steps, and at the end once the time is spent (its own training time, evaluations not counted).
            Assert.True(curve[^1].TrainSeconds >= 1.5, $"stopped at {curve[^1].TrainSeconds} s");
            Assert.All(curve.SkipLast(1), p => Assert.Equal(0, p.Step % 4));
            Assert.True(curve.Zip(curve.Skip(1)).All(p => p.Second.TrainSeconds > p.First.TrainSeconds && p.Second.Step > p.First.Step));
            // The curve is the model's own training, whatever ran beside it: a plain trainer of the same config,
            // to the same step, gives the same validation loss (steps are deterministic).
            var point = curve[0];
            using var alone = new ElasticMoE.Training.Trainer(config, corpus);
            while (alone.Step < point.Step) alone.TrainStep();
            Assert.Equal(point.ValidationLoss, alone.Evaluate());
        }
        // Every step's time is kept (the median tokens/s of the attention race is taken from them), and they add up to the training time.
        Assert.Equal(race.First[^1].Step, race.FirstStepSeconds.Count);
        Assert.Equal(race.Second[^1].Step, race.SecondStepSeconds.Count);
        Assert.Equal(race.First[^1].TrainSeconds, race.FirstStepSeconds.Sum(), 9);
        Assert.Equal(race.First[^1], MoEBenchmarks.At(race.First, race.First[^1].TrainSeconds));
        Assert.Null(MoEBenchmarks.At(race.First, 0));
    }

    [Theory]
    [InlineData("mha", "0")]
    [InlineData("mla", "0")]
    [InlineData("mla", "8")]
    public void The_attention_race_counts_each_attentions_parameters_and_cache(string attention, string qLoraRank)
    {
        var cfg = TestSupport.SmallConfig(("model.attention", attention), ("model.mla.q-lora-rank", qLoraRank));
        using var model = new ElasticMoE.Model.MoETransformer(cfg.Model, 1);
        long n = model.named_parameters().Where(p => p.name.StartsWith("blocks.0.attn.", StringComparison.Ordinal)).Sum(p => p.parameter.numel());
        Assert.Equal(n, AttentionBenchmarks.AttentionParameters(cfg.Model));
        using var cache = model.NewKvCache();
        Assert.Equal(cache.ElementsPerToken, cfg.Model.KvElementsPerToken);
        // The race sets only the attention: MLA's sizes are the config's either way.
        Assert.Equal(ElasticMoE.Configuration.AttentionKind.Mla, AttentionBenchmarks.With(cfg, ElasticMoE.Configuration.AttentionKind.Mla).Model.Attention);
        Assert.Equal(cfg.Model with { Attention = ElasticMoE.Configuration.AttentionKind.Mha }, AttentionBenchmarks.With(cfg, ElasticMoE.Configuration.AttentionKind.Mha).Model);
    }

    [Fact]
    public void The_attention_race_trains_MLA_and_MHA_and_compares_them_at_a_common_step()
    {
        var cfg = TestSupport.SmallConfig(("train.global-batch", "2"), ("train.micro-batch", "2"), ("train.eval-every", "4"), ("train.eval-batches", "1"));
        var corpus = TextCorpus.Default(cfg.Data.ValidationFraction, cfg.Model.Context);
        var race = AttentionBenchmarks.Race(cfg, corpus, seconds: 1.0);
        Assert.Equal(ElasticMoE.Configuration.AttentionKind.Mla, race.Mla.Model.Attention);
        Assert.Equal(ElasticMoE.Configuration.AttentionKind.Mha, race.Mha.Model.Attention);
        Assert.True(race.CommonStep is >= 4, $"common step {race.CommonStep}");
        Assert.NotNull(race.Mla.LossAtStep(race.CommonStep!.Value));
        Assert.NotNull(race.Mha.LossAtStep(race.CommonStep!.Value));
        Assert.NotEqual(race.Mla.LossAtStep(4), race.Mha.LossAtStep(4));
        Assert.True(race.Mla.TokensPerSecond > 0 && race.Mha.TokensPerSecond > 0);
        Assert.Equal(cfg.Model.KvLoraRank + cfg.Model.QkRopeHeadDim, race.Mla.KvElementsPerToken);
        Assert.Equal(2 * cfg.Model.DModel, race.Mha.KvElementsPerToken);
    }
}
