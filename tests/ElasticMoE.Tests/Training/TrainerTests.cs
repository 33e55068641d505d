using ElasticMoE.Checkpointing;
using ElasticMoE.Data;
using ElasticMoE.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace ElasticMoE.Tests.Training;

public class TrainerTests
{
    private static Trainer NewTrainer(params (string, string)[] overrides)
    {
        var cfg = TestSupport.SmallConfig(overrides);
        return new Trainer(cfg, TextCorpus.Default(cfg.Data.ValidationFraction, cfg.Model.Context));
    }

    [Fact]
    public void Loss_falls_on_the_default_corpus()
    {
        using var t = NewTrainer(("train.steps", "40"), ("train.lr", "1e-2"));
        var losses = Enumerable.Range(0, 40).Select(_ => t.TrainStep().Loss).ToList();
        Assert.True(losses.TakeLast(5).Average() < 0.7 * losses[0], $"first {losses[0]:F3}, last {losses[^1]:F3}");
        Assert.True(double.IsFinite(t.Evaluate()));
    }

    [Fact]
    public void Save_load_continue_equals_straight_training_bit_for_bit()
    {
        var dir = TestSupport.TempDir();
        var path = Path.Combine(dir, "run");
        List<double> straight;
        float[] straightParams;
        using (var a = NewTrainer())
        {
            straight = Enumerable.Range(0, 6).Select(_ => a.TrainStep().Loss).ToList();
            straightParams = Flatten(a);
        }
        List<double> resumed;
        using (var b = NewTrainer())
        {
            resumed = Enumerable.Range(0, 3).Select(_ => b.TrainStep().Loss).ToList();
            b.Save(path);
        }
        Assert.Empty(Directory.GetFiles(path, "*.tmp", SearchOption.AllDirectories));
        using (var c = NewTrainer())
        {
            c.Load(path);
            Assert.Equal(3, c.Step);
            resumed.AddRange(Enumerable.Range(0, 3).Select(_ => c.TrainStep().Loss));
            Assert.Equal(straightParams, Flatten(c));
        }
        Assert.Equal(straight, resumed);
    }

    [Fact]
    public void A_corrupted_state_file_is_detected_and_nothing_is_loaded()
    {
        var path = Path.Combine(TestSupport.TempDir(), "run");
        using var t = NewTrainer();
        t.TrainStep();
        t.Save(path);
        var shard = Directory.GetFiles(path, "*.safetensors", SearchOption.AllDirectories).Single();
        var bytes = File.ReadAllBytes(shard);
        bytes[bytes.Length / 2] ^= 0xFF;
        File.WriteAllBytes(shard, bytes);
        using var fresh = NewTrainer();
        var before = Flatten(fresh);
        var e = Assert.Throws<CheckpointCorruptException>(() => fresh.Load(path));
        Assert.Contains(Path.GetFileName(shard), e.Message);
        Assert.Equal(before, Flatten(fresh));
        Assert.Equal(0, fresh.Step);
        File.WriteAllBytes(shard, bytes[..100]);
        Assert.Throws<CheckpointCorruptException>(() => fresh.Load(path));
        Assert.Equal(before, Flatten(fresh));
    }

    [Fact]
    public void A_state_from_a_different_model_is_refused()
    {
        var path = Path.Combine(TestSupport.TempDir(), "run");
        using (var t = NewTrainer()) t.Save(path);
        using var other = NewTrainer(("model.moe.routed-experts", "6"));
        var ex = Assert.Throws<ElasticMoE.Configuration.ConfigException>(() => other.Load(path));
        Assert.Contains("differs", ex.Message);
    }

    [Fact]
    public void A_NaN_loss_stops_training_naming_the_step_and_changes_nothing()
    {
        using var t = NewTrainer();
        t.TrainStep();
        t.TrainStep();
        using (no_grad()) t.Model.parameters().First().fill_(float.NaN);  // the embedding
        var others = t.Model.parameters().Skip(1).Select(p => p.clone()).ToList();
        var ex = Assert.Throws<TrainingDivergedException>(() => t.TrainStep());
        Assert.Equal(2, ex.Step);
        Assert.Contains("step 2", ex.Message);
        Assert.Equal(2, t.Step);
        foreach (var (before, after) in others.Zip(t.Model.parameters().Skip(1)))
            Assert.True(before.equal(after).all().item<bool>(), "no parameter may move on a diverged step");
    }

    [Fact]
    public void Live_tensor_count_stays_flat_across_steps()
    {
        using var t = NewTrainer(("train.steps", "30"));
        for (int i = 0; i < 5; i++) t.TrainStep();   // optimizer moments are created lazily in the first step
        long before = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
        for (int i = 0; i < 20; i++) t.TrainStep();
        t.Evaluate();
        long after = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
        Assert.True(after - before <= 0, $"live tensors grew from {before} to {after} over 20 steps");
    }

    [Fact]
    public void Optimizer_step_and_gradient_norm_leave_no_tensor_handle_behind_outside_any_scope()
    {
        // Actors call these with no scope of their own around them. A handle left to the GC keeps the
        // gradient it points at alive past zero_grad, so every step allocates fresh gradient memory.
        TestSupport.EnsureTorch();
        using var w = randn(16, 8).requires_grad_(true);
        using var opt = new AdamW(0.9, 0.95, 1e-8, 0.1);
        void Step()
        {
            using (var scope = NewDisposeScope()) (w * w).sum().backward();
            GradClip.SumOfSquares([w]);
            opt.Step([("w", w)], 1e-3, 0.5);
            w.grad = null;
        }
        Step();   // creates the moments
        long before = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
        for (int i = 0; i < 10; i++) Step();
        Assert.Equal(before, DisposeScopeManager.Statistics.ThreadTotalLiveCount);
    }

    [Fact]
    public void Lr_schedule_warms_up_then_decays_to_the_floor()
    {
        Assert.Equal(0.1, LrSchedule.At(0, 100, 1.0, 0.1, 10), 10);
        Assert.Equal(1.0, LrSchedule.At(9, 100, 1.0, 0.1, 10), 10);
        Assert.Equal(1.0, LrSchedule.At(10, 100, 1.0, 0.1, 10), 10);
        Assert.Equal(0.1, LrSchedule.At(99, 100, 1.0, 0.1, 10), 10);
        Assert.True(LrSchedule.At(50, 100, 1.0, 0.1, 10) is > 0.1 and < 1.0);
    }

    [Fact]
    public void Clip_coefficient_scales_to_the_limit()
    {
        Assert.Equal(1.0, GradClip.Coefficient(0.25, 1.0));
        Assert.Equal(0.5, GradClip.Coefficient(4.0, 1.0), 5);
        Assert.Equal(1.0, GradClip.Coefficient(400.0, 0));
    }

    private static float[] Flatten(Trainer t)
        => t.Model.parameters().SelectMany(p => p.detach().reshape(-1).data<float>().ToArray()).ToArray();
}

public class ShakespeareTests
{
    [Fact]
    public void Trains_on_tiny_shakespeare_given_by_path()
    {
        var path = TestSupport.SharedData("tinyshakespeare.txt");
        Assert.True(path is not null, "../shared/data/tinyshakespeare.txt should sit beside the checkout");
        var cfg = TestSupport.SmallConfig(("data.path", path!), ("train.lr", "1e-2"), ("train.steps", "40"));
        using var t = new Trainer(cfg, TextCorpus.Load(cfg.Data.Path, cfg.Data.ValidationFraction, cfg.Model.Context));
        Assert.Equal("tinyshakespeare.txt", t.Sampler.Corpus.Name);
        double before = t.Evaluate();
        for (int i = 0; i < 40; i++) t.TrainStep();
        double after = t.Evaluate();
        Assert.True(after < before - 1.0, $"validation loss should fall by more than a nat: {before:F3} -> {after:F3}");
    }
}
