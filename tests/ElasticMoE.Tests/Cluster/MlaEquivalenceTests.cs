using ElasticMoE.Configuration;
using ElasticMoE.Data;
using ElasticMoE.Runtime.Actors;
using ElasticMoE.Runtime.Hosting;
using ElasticMoE.Training;
using Xunit.Abstractions;

namespace ElasticMoE.Tests.Cluster;

/// <summary>
/// A model with multi-head latent attention (model.attention = mla, query latent on) on actor clusters of several
/// shapes, re-laid out mid-run and resumed from a checkpoint in another layout, against its single-process loop: MLA's
/// tensors are block units like MHA's, so everything that moves or persists units must keep the curve bit for bit.
/// </summary>
[Collection("cluster")]
public class MlaEquivalenceTests(ITestOutputHelper output)
{
    private const int Steps = 30;

    // Four layers so that PP = 4 and re-layouts across stages are possible; the query latent on (q-lora-rank 12),
    // so every MLA tensor (wq_a, q_norm, wq_b, wkv_a, kv_norm, wkv_b, proj) trains, moves and is checkpointed.
    private static ElasticMoEConfig Config(params (string, string)[] extra) => TestSupport.SmallConfig(
    [
        ("seed", "1"), ("model.attention", "mla"), ("model.mla.q-lora-rank", "12"), ("model.mla.kv-lora-rank", "16"),
        ("model.mla.qk-nope-head-dim", "8"), ("model.mla.qk-rope-head-dim", "4"), ("model.mla.v-head-dim", "12"),
        ("model.layers", "4"), ("model.dense-layers", "1"), ("model.moe.routed-experts", "6"),
        ("train.global-batch", "12"), ("train.micro-batch", "2"), ("train.steps", Steps.ToString()),
        ("train.eval-every", "10"), ("train.eval-batches", "2"), ("cluster.checksum-every", "5"), .. extra,
    ]);

    private static readonly Lazy<(List<StepResult> Steps, Dictionary<string, (double Sum, double Norm)> Params)> Reference =
        new(() => SingleProcessReference.Train(Config(), Steps));

    private static async Task<RunResult> Run(ElasticMoEConfig cfg)
    {
        var corpus = TextCorpus.Default(cfg.Data.ValidationFraction, cfg.Model.Context);
        using var report = new TrainingReport(TextWriter.Null, null);
        return await LocalCluster.RunAsync(cfg, corpus, report).WaitAsync(TimeSpan.FromMinutes(4));
    }

    [Theory]
    [InlineData("MLA, 1 node", 1, 1)]
    [InlineData("MLA, 2 nodes PP=2", 2, 2)]
    [InlineData("MLA, 3 nodes PP=3, experts on all", 3, 3)]
    [InlineData("MLA, 4 nodes DP=2 x PP=2", 4, 2)]
    public async Task An_MLA_run_on_a_cluster_is_bit_identical_to_its_single_process_loop(string name, int nodes, int pp)
    {
        var result = await Run(Config(("cluster.nodes", nodes.ToString()), ("cluster.pipeline-stages", pp.ToString())));
        var (reference, expectedParams) = Reference.Value;
        SingleProcessReference.AssertStepsIdentical(name, result.Steps, reference);
        SingleProcessReference.AssertParametersIdentical(name, expectedParams, result.FinalParameters);
        Assert.Contains(expectedParams.Keys, k => k.EndsWith(".attn.wkv_b.weight", StringComparison.Ordinal));
        Assert.Equal(3, result.Validation.Count);
        output.WriteLine($"{name}: {Steps} steps bit-identical to the single-process loop, {result.Seconds:F1} s");
    }

    [Fact]
    public async Task Two_nodes_DP_2_repeat_bit_for_bit_and_equal_the_single_process_loop()
    {
        var cfg = Config(("cluster.nodes", "2"));
        var first = await Run(cfg);
        var second = await Run(cfg);
        SingleProcessReference.AssertStepsIdentical("MLA DP=2, repeat", second.Steps, first.Steps);
        SingleProcessReference.AssertParametersIdentical("MLA DP=2, repeat", first.FinalParameters, second.FinalParameters);
        SingleProcessReference.AssertStepsIdentical("MLA DP=2", first.Steps, Reference.Value.Steps);
    }

    [Fact]
    public async Task A_relayout_mid_run_moves_MLA_blocks_and_keeps_the_curve()
    {
        // DP 3, then 2 workers x PP 2 at step 10, then DP 3 again at step 20: blocks (with their MLA tensors) change owners.
        var result = await Run(Config(("cluster.nodes", "3"), ("cluster.relayout", "10=2x2,20=3x1"), ("cluster.redundancy", "0")));
        var (reference, expectedParams) = Reference.Value;
        double worst = SingleProcessReference.AssertStepsMatch("MLA re-layout", result.Steps, reference);
        Assert.True(worst <= 1e-4, $"worst relative loss difference {worst:E2}");
        SingleProcessReference.AssertParametersMatch("MLA re-layout", expectedParams, result.FinalParameters);
        Assert.Equal([(0L, 3, 1), (10L, 1, 2), (20L, 3, 1)], result.Plans.Select(p => (p.AtStep, p.Dp, p.Pp)).ToArray());
        Assert.Contains(result.Plans.Skip(1), p => p.MovedUnits.Any(u => u.Kind == ElasticMoE.State.UnitKind.Block));
        output.WriteLine(string.Join("; ", result.Plans.Select(p => $"e{p.Epoch}@{p.AtStep} {p.Dp}x{p.Pp} {p.UnitsMoved} units {p.BytesMoved / 1024.0:F0} KiB")));
    }

    [Fact]
    public async Task An_MLA_checkpoint_of_a_DP_run_resumes_in_a_pipeline_layout_on_the_same_curve()
    {
        // 20 steps of a 20-step schedule on DP 2 (checkpoints at 10 and 20), then the same run directory told to go on to
        // step 30 on two pipeline stages: it loads the step-20 checkpoint's units into the other layout.
        var dir = Path.Combine(TestSupport.TempDir(), "mla-run");
        var short_ = Config(("train.steps", "20"), ("checkpoint.every", "10"));
        var first = await Run(short_ with { RunDirectory = dir, Cluster = short_.Cluster with { Nodes = 2 } });
        var resumed = await Run(Config(("cluster.nodes", "2"), ("cluster.pipeline-stages", "2"), ("checkpoint.every", "10")) with { RunDirectory = dir });

        // The single-process loop with the same history (the learning-rate schedule is the step count's): 20 steps, a
        // checkpoint, and a 30-step trainer loading it.
        var corpus = TextCorpus.Default(short_.Data.ValidationFraction, short_.Model.Context);
        var refDir = Path.Combine(TestSupport.TempDir(), "mla-reference");
        using var a = new Trainer(short_, corpus);
        var before = Enumerable.Range(0, 20).Select(_ => a.TrainStep()).ToList();
        a.Save(refDir);
        using var b = new Trainer(Config(), corpus);
        b.Load(refDir);
        var afterReference = Enumerable.Range(0, Steps - 20).Select(_ => b.TrainStep()).ToList();

        SingleProcessReference.AssertStepsIdentical("MLA DP=2, first 20 steps", first.Steps, before);
        var after = resumed.Steps.Where(s => s.Step >= 20).ToList();
        Assert.Equal(Enumerable.Range(20, Steps - 20).Select(s => (long)s), after.Select(s => s.Step));
        SingleProcessReference.AssertStepsIdentical("MLA resumed at PP=2", after, afterReference);
        SingleProcessReference.AssertParametersIdentical("MLA resumed at PP=2", SingleProcessReference.Parameters(b), resumed.FinalParameters);
    }
}
