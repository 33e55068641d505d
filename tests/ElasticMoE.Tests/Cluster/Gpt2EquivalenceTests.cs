using ElasticMoE.Data;
using ElasticMoE.Runtime.Hosting;
using ElasticMoE.Training;
using Xunit.Abstractions;

namespace ElasticMoE.Tests.Cluster;

/// <summary>A GPT-2 BPE run on actor clusters of 1, 2 and 3 nodes against its single-process loop.</summary>
[Collection("cluster")]
public class Gpt2EquivalenceTests(ITestOutputHelper output)
{
    private const int Steps = 12;

    private static ElasticMoE.Configuration.ElasticMoEConfig Config(params (string, string)[] cluster) => TestSupport.SmallConfig(
    [
        ("data.tokenizer", "gpt2"), ("model.layers", "3"), ("model.dense-layers", "1"), ("model.moe.routed-experts", "6"),
        ("train.global-batch", "12"), ("train.micro-batch", "2"), ("train.steps", Steps.ToString()),
        ("train.eval-every", "6"), ("train.eval-batches", "2"), ("cluster.checksum-every", "5"), .. cluster,
    ]);

    private static readonly Lazy<(List<StepResult> Steps, Dictionary<string, (double Sum, double Norm)> Params)> Reference =
        new(() => SingleProcessReference.Train(Config(), Steps));

    [Theory]
    [InlineData("gpt2, 1 node", 1, 1)]
    [InlineData("gpt2, 2 nodes DP=2", 2, 1)]
    [InlineData("gpt2, 3 nodes PP=3, experts on all", 3, 3)]
    public async Task A_BPE_run_on_a_cluster_matches_its_single_process_loop(string name, int nodes, int pp)
    {
        var cfg = Config(("cluster.nodes", nodes.ToString()), ("cluster.pipeline-stages", pp.ToString()));
        Assert.Equal(50257, cfg.Model.VocabSize);
        var corpus = TextCorpus.Load(cfg);
        using var report = new TrainingReport(TextWriter.Null, null);
        var result = await LocalCluster.RunAsync(cfg, corpus, report).WaitAsync(TimeSpan.FromMinutes(4));
        var (reference, expectedParams) = Reference.Value;
        double worst = SingleProcessReference.AssertStepsMatch(name, result.Steps, reference);
        output.WriteLine($"{name}: worst relative loss difference over {Steps} steps {worst:E2}, {result.Seconds:F1} s");
        Assert.True(worst <= 1e-4, $"{name}: {worst:E2}");
        SingleProcessReference.AssertParametersMatch(name, expectedParams, result.FinalParameters);
        Assert.Equal(2, result.Validation.Count);
    }
}
