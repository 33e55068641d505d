using ElasticMoE.Data;
using ElasticMoE.Inference;
using ElasticMoE.Training;
using static TorchSharp.torch;

namespace ElasticMoE.Tests.Inference;

public class GenerationTests
{
    /// <summary>A small model trained a few steps, so that its logits are not the near-uniform ones of the initialisation.</summary>
    /// <param name="attention">"mha", or "mla" (query latent on): then the cache is MLA's latent one, read by the absorbed form.</param>
    private static Trainer Trained(int steps = 15, string attention = "mha")
    {
        var config = TestSupport.SmallConfig(("train.steps", steps.ToString(System.Globalization.CultureInfo.InvariantCulture)),
            ("model.attention", attention), ("model.mla.q-lora-rank", "12"), ("model.mla.kv-lora-rank", "16"),
            ("model.mla.qk-nope-head-dim", "8"), ("model.mla.qk-rope-head-dim", "4"), ("model.mla.v-head-dim", "12"));
        var trainer = new Trainer(config, TextCorpus.Default(config.Data.ValidationFraction, config.Model.Context));
        for (int i = 0; i < steps; i++) trainer.TrainStep();
        return trainer;
    }

    [Theory]
    [InlineData("mha")]
    [InlineData("mla")]
    public void The_KV_cache_gives_the_tokens_and_logits_of_the_full_forward(string attention)
    {
        using var trainer = Trained(attention: attention);
        var prompt = ByteTokenizer.Instance.Encode("the lazy ");
        // 60 tokens at a context of 16: the window jumps (and the cache refills) several times.
        var cachedLogits = new List<float[]>();
        var fullLogits = new List<float[]>();
        var greedy = new SamplingOptions(Temperature: 0);
        var cached = TextGeneration.Run(trainer.Model, prompt, 60, greedy, kvCache: true, onLogits: cachedLogits.Add);
        var full = TextGeneration.Run(trainer.Model, prompt, 60, greedy, kvCache: false, onLogits: fullLogits.Add);
        Assert.Equal(full.Tokens, cached.Tokens);
        double worst = 0;
        for (int s = 0; s < fullLogits.Count; s++)
            for (int v = 0; v < fullLogits[s].Length; v++)
                worst = Math.Max(worst, Math.Abs(fullLogits[s][v] - cachedLogits[s][v]));
        Assert.True(worst <= 1e-5, $"cached logits differ from the full forward's by up to {worst}");
    }

    [Theory]
    [InlineData("mha")]
    [InlineData("mla")]
    public void Cached_logits_of_each_position_match_the_full_forward_of_the_prefix(string attention)
    {
        using var trainer = Trained(attention: attention);
        var model = trainer.Model;
        model.eval();
        var tokens = ByteTokenizer.Instance.Encode("alice: hello bob");
        using var _ = no_grad();
        using var cache = model.NewKvCache();
        using var full = model.forward(tensor(tokens.Select(t => (long)t).ToArray(), [1, tokens.Length]));
        // The first half as one prefill, then one token at a time.
        int prefill = tokens.Length / 2;
        using var first = model.ForwardCached(tensor(tokens.Take(prefill).Select(t => (long)t).ToArray(), [1, prefill]), cache);
        var steps = new List<Tensor> { first };
        for (int i = prefill; i < tokens.Length; i++)
            steps.Add(model.ForwardCached(tensor(new long[] { tokens[i] }, [1, 1]), cache));
        using var all = cat(steps, 1);
        Assert.Equal(tokens.Length, cache.Length);
        // MLA keeps the latent and the RoPE key (16 + 4 per token and layer), MHA a key and a value per head (2 x 2 x 16).
        Assert.Equal(attention == "mla" ? 16 + 4 : 2 * 2 * 16, cache.ElementsPerToken);
        var worst = (all - full).abs().max().item<float>();
        Assert.True(worst <= 1e-5, $"max |cached - full| = {worst}");
        foreach (var t in steps.Skip(1)) t.Dispose();
        model.TakeExpertCounts();
    }

    [Fact]
    public void The_sampler_is_a_function_of_its_seed_and_top_k_1_is_greedy()
    {
        var rng = new Random(5);
        var logits = Enumerable.Range(0, 256).Select(_ => (float)rng.NextDouble() * 4).ToArray();
        int[] Draw(SamplingOptions o)
        {
            var s = new TokenSampler(o);
            return Enumerable.Range(0, 50).Select(_ => s.Next(logits)).ToArray();
        }
        var a = Draw(new SamplingOptions(1.0, 0, 0.9, 11));
        Assert.Equal(a, Draw(new SamplingOptions(1.0, 0, 0.9, 11)));
        Assert.NotEqual(a, Draw(new SamplingOptions(1.0, 0, 0.9, 12)));
        Assert.True(a.Distinct().Count() > 5, "a temperature of 1 over near-equal logits draws many tokens");
        Assert.All(Draw(new SamplingOptions(2.0, 1, 1.0, 3)), t => Assert.Equal(TokenSampler.ArgMax(logits), t));
        var top5 = Enumerable.Range(0, 256).OrderByDescending(i => logits[i]).Take(5).ToHashSet();
        Assert.All(Draw(new SamplingOptions(5.0, 5, 1.0, 4)), t => Assert.Contains(t, top5));
        Assert.All(Draw(new SamplingOptions(1.0, 0, 1e-9, 4)), t => Assert.Equal(TokenSampler.ArgMax(logits), t));
    }

    [Fact]
    public void The_text_stream_holds_back_an_incomplete_character_until_it_is_whole()
    {
        var stream = new TextStream(ByteTokenizer.Instance);
        var bytes = System.Text.Encoding.UTF8.GetBytes("aé€");
        var pieces = bytes.Select(b => stream.Push(b)).ToList();
        Assert.Equal(["a", "", "é", "", "", "€"], pieces);
        Assert.Equal("", stream.Flush());
        var cut = new TextStream(ByteTokenizer.Instance);
        Assert.Equal("b", cut.Push('b') + cut.Push(0xE2));
        Assert.Equal("\uFFFD", cut.Flush());
    }

    [Fact]
    public void The_context_window_jumps_by_half_a_context_when_the_text_outgrows_it()
    {
        Assert.Equal(0, ContextWindow.Start(0, 16, 16));
        Assert.Equal(9, ContextWindow.Start(0, 17, 16));
        Assert.Equal(9, ContextWindow.Start(9, 25, 16));
        Assert.Equal(18, ContextWindow.Start(9, 26, 16));
        Assert.Equal(92, ContextWindow.Start(0, 100, 16)); // a prompt longer than the context: its last half context
    }

    [Fact]
    public void Run_settings_read_back_the_model_the_fingerprint_was_made_of()
    {
        var config = TestSupport.SmallConfig(("model.moe.scoring", "softmax"), ("model.rope-theta", "500000.5"), ("seed", "99"));
        var run = RunSettings.Parse(TrainingState.RunFingerprint(config, "abc"));
        Assert.Equal(config.Model, run.Model);
        Assert.Equal(99, run.Seed);
        Assert.Equal("abc", run.DataFingerprint);
        Assert.Equal(config.Train.MicroBatch, run.TrainInt("MicroBatch"));
        Assert.Throws<InvalidDataException>(() => RunSettings.Parse("seed=1;data=x"));
        var mla = TestSupport.SmallConfig(("model.attention", "mla"), ("model.mla.q-lora-rank", "12"), ("model.mla.v-head-dim", "10"));
        Assert.Equal(mla.Model, RunSettings.Parse(TrainingState.RunFingerprint(mla, "abc")).Model);
    }

    [Fact]
    public void Eval_on_tokens_of_one_window_is_the_cross_entropy_of_one_forward()
    {
        using var trainer = Trained(5);
        var model = trainer.Model;
        var tokens = ByteTokenizer.Instance.Encode("carol buys 3 ropes."); // 19 tokens: a window of 16 and one of 2
        var result = Evaluation.OnTokens(model, tokens, ByteTokenizer.Instance);
        using var _ = no_grad();
        double nats = 0;
        foreach (var (from, len) in new[] { (0, 16), (16, 2) })
        {
            using var x = tensor(tokens.Skip(from).Take(len).Select(t => (long)t).ToArray(), [1, len]);
            using var y = tensor(tokens.Skip(from + 1).Take(len).Select(t => (long)t).ToArray(), [1, len]);
            using var logits = model.forward(x);
            nats += Training_CrossEntropySum(logits, y);
        }
        Assert.Equal(18, result.Tokens);
        Assert.Equal(nats / 18, result.NatsPerToken, 5);
        Assert.Equal(result.NatsPerToken, result.NatsPerByte, 12);
        model.TakeExpertCounts();
    }

    private static double Training_CrossEntropySum(Tensor logits, Tensor targets)
    {
        using var ce = ElasticMoE.Model.MoETransformer.CrossEntropy(logits, targets);
        return ce.item<float>() * targets.numel();
    }
}
