using ElasticMoE.Configuration;
using ElasticMoE.Data;
using ElasticMoE.Model;
using ElasticMoE.State;
using ElasticMoE.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace ElasticMoE.Tests.Model;

/// <summary>Multi-head latent attention: its gradients, its absorbed (cached) form against the plain one, and its parameters as units.</summary>
public class LatentAttentionTests
{
    // Odd sizes on purpose (heads 3, nope 6, v 5, latent 12): a wrong view or a swapped W_UK / W_UV half fails here.
    private static ModelOptions Options(int qLoraRank) => TestSupport.SmallConfig().Model with
    {
        DModel = 16, Heads = 3, Attention = AttentionKind.Mla, QLoraRank = qLoraRank, KvLoraRank = 12,
        QkNopeHeadDim = 6, QkRopeHeadDim = 4, VHeadDim = 5,
    };

    /// <summary>The module in float64 with every parameter random (norm weights too, so their gradients are not all of a one).</summary>
    private static (MultiHeadLatentAttention Attention, Rope Rope) Module(ModelOptions o)
    {
        var rope = new Rope(o.QkRopeHeadDim, o.Context, o.RopeTheta, CPU, ScalarType.Float64);
        var attn = new MultiHeadLatentAttention(o, rope);
        attn.to(ScalarType.Float64);
        using var gen = new Generator(7);
        using (no_grad())
            foreach (var p in attn.parameters()) p.normal_(p.dim() < 2 ? 1.0 : 0.0, 0.3, gen);
        return (attn, rope);
    }

    [Theory]
    [InlineData(0)]
    [InlineData(8)]
    public void Gradients_match_finite_differences_in_float64(int qLoraRank)
    {
        var o = Options(qLoraRank);
        var (attn, rope) = Module(o);
        using var _a = attn;
        using var _r = rope;
        using var gen = new Generator(3);
        var x = randn(new long[] { 2, 5, o.DModel }, ScalarType.Float64, generator: gen).requires_grad_(true);
        var w = randn(new long[] { 2, 5, o.DModel }, ScalarType.Float64, generator: gen);
        double Loss() { using var _ = no_grad(); return (attn.forward(x) * w).sum().item<double>(); }

        attn.zero_grad();
        (attn.forward(x) * w).sum().backward();

        var checks = new List<(string Name, Tensor P)> { ("input", x) };
        checks.AddRange(attn.named_parameters().Select(p => (p.name, (Tensor)p.parameter)));
        // wq or wq_a/q_norm/wq_b, wkv_a, kv_norm, wkv_b, proj.
        Assert.Equal(qLoraRank > 0 ? 7 : 5, checks.Count - 1);
        foreach (var (name, p) in checks)
            Assert.True(p.grad!.abs().sum().item<double>() > 0, $"{name} gets no gradient");
        GradientCheck.AssertMatches(Loss, checks, new Random(5), perTensor: 8, absolute: 1e-7, relative: 1e-6);
    }

    [Theory]
    [InlineData(0)]
    [InlineData(8)]
    public void The_absorbed_form_over_the_latent_cache_equals_the_plain_forward(int qLoraRank)
    {
        var o = Options(qLoraRank);
        var (attn, rope) = Module(o);
        using var _a = attn;
        using var _r = rope;
        using var gen = new Generator(4);
        using var _ = no_grad();
        var x = randn(new long[] { 2, 9, o.DModel }, ScalarType.Float64, generator: gen);
        using var full = attn.forward(x);
        using var cache = new KvCache([attn.NewCacheLayer(2, o.Context, ScalarType.Float64, CPU)]);
        // A prompt of 4 rows into the empty cache (the causal mask), then one row at a time.
        var parts = new List<Tensor> { attn.ForwardCached(x.narrow(1, 0, 4), cache[0]) };
        for (int i = 4; i < 9; i++) parts.Add(attn.ForwardCached(x.narrow(1, i, 1), cache[0]));
        using var cached = cat(parts, 1);
        double worst = (cached - full).abs().max().item<double>();
        Assert.True(worst < 1e-12, $"max |absorbed - plain| = {worst:E3}");
        // What it keeps per token: the latent and the one shared RoPE key, not a key and a value per head.
        Assert.Equal(9, cache.Length);
        Assert.Equal(o.KvLoraRank + o.QkRopeHeadDim, cache.ElementsPerToken);
        Assert.Equal(o.KvElementsPerToken, cache.ElementsPerToken);
        Assert.Throws<ArgumentException>(() => attn.ForwardCached(x.narrow(1, 0, 2), cache[0]));
    }

    [Fact]
    public void An_MLA_model_is_a_function_of_its_seed_and_its_tensors_are_block_units()
    {
        var o = TestSupport.SmallConfig().Model with { Attention = AttentionKind.Mla, QLoraRank = 8, KvLoraRank = 16, QkNopeHeadDim = 8, QkRopeHeadDim = 4, VHeadDim = 8 };
        using var a = new MoETransformer(o, 5);
        using var b = new MoETransformer(o, 5);
        using var c = new MoETransformer(o, 6);
        var pa = a.named_parameters().ToList();
        var pb = b.named_parameters().ToDictionary(p => p.name, p => p.parameter);
        var pc = c.named_parameters().ToDictionary(p => p.name, p => p.parameter);
        foreach (var (name, p) in pa)
        {
            Assert.True(p.eq(pb[name]).all().item<bool>(), $"{name} differs between two models of one seed");
            if (p.dim() >= 2) Assert.False(p.eq(pc[name]).all().item<bool>(), $"{name} is the same under another seed");
        }
        var attention = pa.Where(p => p.name.Contains(".attn.", StringComparison.Ordinal)).Select(p => p.name).ToList();
        Assert.Contains("blocks.0.attn.wkv_a.weight", attention);
        Assert.Contains("blocks.2.attn.wq_b.weight", attention);
        Assert.Contains("blocks.1.attn.kv_norm.weight", attention);
        Assert.All(attention, n => Assert.Equal(UnitKind.Block, UnitCatalog.OfTensor(n).Kind));
        // The output projection is initialised as a residual one (scaled by 1/sqrt(2L)), like MHA's.
        double std = pa.Single(p => p.name == "blocks.0.attn.proj.weight").parameter.std().item<float>();
        Assert.InRange(std, 0.5 * 0.02 / Math.Sqrt(2.0 * o.Layers), 1.5 * 0.02 / Math.Sqrt(2.0 * o.Layers));
        using var cache = a.NewKvCache();
        Assert.Equal(16 + 4, cache.ElementsPerToken);
        using var mha = new MoETransformer(TestSupport.SmallConfig().Model, 5);
        using var mhaCache = mha.NewKvCache();
        Assert.Equal(2 * 2 * 16, mhaCache.ElementsPerToken);
    }

    [Fact]
    public void A_single_process_MLA_checkpoint_resumes_bit_for_bit_and_an_MHA_model_refuses_it()
    {
        var cfg = TestSupport.SmallConfig(("model.attention", "mla"), ("model.mla.q-lora-rank", "8"));
        var corpus = TextCorpus.Default(cfg.Data.ValidationFraction, cfg.Model.Context);
        var dir = Path.Combine(TestSupport.TempDir(), "run");
        using var a = new Trainer(cfg, corpus);
        for (int i = 0; i < 5; i++) a.TrainStep();
        a.Save(dir);
        var expected = Enumerable.Range(0, 5).Select(_ => a.TrainStep()).Select(r => (r.Loss, r.GradNorm)).ToList();
        using var b = new Trainer(cfg, corpus);
        b.Load(dir);
        Assert.Equal(5, b.Step);
        Assert.Equal(expected, Enumerable.Range(0, 5).Select(_ => b.TrainStep()).Select(r => (r.Loss, r.GradNorm)).ToList());
        using var mha = new Trainer(TestSupport.SmallConfig(), corpus);
        var e = Assert.Throws<ConfigException>(() => mha.Load(dir));
        Assert.Contains("-mla-", e.Message);
    }
}
