using ElasticMoE.Data;
using ElasticMoE.Runtime.Hosting;
using ElasticMoE.Training;

namespace ElasticMoE.Tests.Cluster;

[Collection("cluster")]
public class MembershipTests
{
    [Fact]
    public async Task A_node_with_a_different_model_config_is_refused_with_the_reason()
    {
        var cfg = TestSupport.SmallConfig(("cluster.nodes", "0"), ("cluster.expected-nodes", "1"));
        var corpus = TextCorpus.Default(cfg.Data.ValidationFraction, cfg.Model.Context);
        using var report = new TrainingReport(TextWriter.Null, null);
        await using var coordinator = ClusterNode.Start(cfg, corpus, coordinator: true, worker: false, report: report);
        var other = TestSupport.SmallConfig(("model.d-model", "48"), ("model.heads", "3"));
        await using var node = ClusterNode.Start(other, corpus, coordinator: false, worker: true, join: coordinator.Address);
        var refused = Assert.IsType<RunOutcome.Refused>(await node.Stopped.WaitAsync(TimeSpan.FromSeconds(60)));
        Assert.StartsWith("model config differs", refused.Reason);
        Assert.Contains("d48", refused.Reason);
        Assert.Contains("d32", refused.Reason);
        Assert.False(coordinator.Result.IsCompleted);   // the coordinator keeps waiting for a proper node
    }

    [Fact]
    public async Task A_node_with_a_different_seed_is_refused()
    {
        var cfg = TestSupport.SmallConfig(("cluster.nodes", "0"), ("cluster.expected-nodes", "1"));
        var corpus = TextCorpus.Default(cfg.Data.ValidationFraction, cfg.Model.Context);
        using var report = new TrainingReport(TextWriter.Null, null);
        await using var coordinator = ClusterNode.Start(cfg, corpus, coordinator: true, worker: false, report: report);
        await using var node = ClusterNode.Start(cfg with { Seed = cfg.Seed + 1 }, corpus, coordinator: false, worker: true, join: coordinator.Address);
        var refused = Assert.IsType<RunOutcome.Refused>(await node.Stopped.WaitAsync(TimeSpan.FromSeconds(60)));
        Assert.Contains("seed differs", refused.Reason);
    }
}
