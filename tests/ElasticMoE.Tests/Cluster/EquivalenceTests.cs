using ElasticMoE.Configuration;
using ElasticMoE.Data;
using ElasticMoE.Runtime.Actors;
using ElasticMoE.Runtime.Hosting;
using ElasticMoE.Training;
using Xunit.Abstractions;

namespace ElasticMoE.Tests.Cluster;

/// <summary>
/// The same seed and config trained by the single-process loop and by actor clusters of different
/// shapes, with real ActorSystems talking TCP on loopback: every step's loss and gradient norm, and every final
/// parameter, bit-identical (the canonical reduction).
/// </summary>
[Collection("cluster")]
public class EquivalenceTests(ITestOutputHelper output)
{
    private const int Steps = 50;

    private static ElasticMoEConfig Config(params (string, string)[] cluster)
    {
        var settings = new List<(string, string)>
        {
            ("model.layers", "3"), ("model.dense-layers", "1"), ("model.moe.routed-experts", "6"),
            ("train.global-batch", "12"), ("train.micro-batch", "2"), ("train.steps", Steps.ToString()),
            ("train.eval-every", "25"), ("train.eval-batches", "2"), 
            ("cluster.checksum-every", "5"),
        };
        settings.AddRange(cluster);
        return TestSupport.SmallConfig(settings.ToArray());
    }

    private static readonly Lazy<(List<StepResult> Steps, Dictionary<string, (double Sum, double Norm)> Params)> Reference =
        new(() => SingleProcessReference.Train(Config(), Steps));

    [Theory]
    [InlineData("1 node", 1, 1, false)]
    [InlineData("1 node, stage and shards on the compute loop", 1, 1, true)]
    [InlineData("2 nodes DP=2", 2, 1, false)]
    [InlineData("2 nodes PP=2", 2, 2, false)]
    [InlineData("2 nodes PP=2, first stage on the compute loop", 2, 2, true)]
    [InlineData("3 nodes DP=3, experts on all", 3, 1, false)]
    [InlineData("3 nodes PP=3, experts on all", 3, 3, false)]
    [InlineData("4 nodes DP=4", 4, 1, false)]
    [InlineData("4 nodes DP=2 x PP=2", 4, 2, false)]
    public async Task Cluster_losses_match_the_single_process_loop(string name, int nodes, int pp, bool computeLoop)
    {
        var cfg = Config(("cluster.nodes", nodes.ToString()), ("cluster.pipeline-stages", pp.ToString()));
        var corpus = TextCorpus.Default(cfg.Data.ValidationFraction, cfg.Model.Context);
        using var report = new TrainingReport(TextWriter.Null, null);
        // As `elasticmoe train` runs it: a thread of its own serves the loop the first worker's actors run on.
        var result = computeLoop
            ? await Task.Factory.StartNew(() => LocalCluster.Run(cfg, corpus, report), TaskCreationOptions.LongRunning).WaitAsync(TimeSpan.FromMinutes(4))
            : await LocalCluster.RunAsync(cfg, corpus, report).WaitAsync(TimeSpan.FromMinutes(4));
        var (reference, expectedParams) = Reference.Value;

        Assert.Equal(Steps, result.Steps.Count);
        SingleProcessReference.AssertStepsIdentical(name, result.Steps, reference);
        output.WriteLine($"{name}: {Steps} steps bit-identical to the single-process loop, {result.Seconds:F1} s");
        SingleProcessReference.AssertParametersIdentical(name, expectedParams, result.FinalParameters);
        Assert.Equal(2, result.Validation.Count);
    }

    [Fact]
    public async Task Bf16_gradient_compression_trains_close_to_the_reference()
    {
        var cfg = Config(("cluster.nodes", "2"), ("cluster.compress-gradients", "true"));
        var corpus = TextCorpus.Default(cfg.Data.ValidationFraction, cfg.Model.Context);
        using var report = new TrainingReport(TextWriter.Null, null);
        var result = await LocalCluster.RunAsync(cfg, corpus, report).WaitAsync(TimeSpan.FromMinutes(4));
        var expected = Reference.Value.Steps.Select(r => r.Loss).ToList();
        // bf16 keeps ~3 significant digits of each gradient: not bit-equal, but the same curve.
        double worst = Enumerable.Range(0, Steps).Max(i => Math.Abs(result.Steps[i].Loss - expected[i]) / expected[i]);
        output.WriteLine($"bf16 all-reduce: worst relative loss difference {worst:E2}");
        Assert.True(worst < 5e-2, $"worst relative difference {worst:E2}");
        Assert.True(result.Steps.Any(s => s.Loss != expected[(int)s.Step]), "compression should change some bits");
        Assert.True(result.Steps[^1].Loss < 0.8 * result.Steps[0].Loss);
    }
}
