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
        Assert.StartsWith("run config differs", refused.Reason);
        Assert.Contains("model.DModel: 48 vs 32", refused.Reason);
        Assert.Contains("model.Heads: 3 vs 2", refused.Reason);
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

    [Fact]
    public async Task A_node_with_another_batch_size_or_corpus_is_refused_naming_it()
    {
        // Same model and seed, but the node would cut other micro-batches or read other text: it would
        // compute different gradients without any error, so the coordinator must refuse it.
        var cfg = TestSupport.SmallConfig(("cluster.nodes", "0"), ("cluster.expected-nodes", "1"));
        var corpus = TextCorpus.Default(cfg.Data.ValidationFraction, cfg.Model.Context);
        using var report = new TrainingReport(TextWriter.Null, null);
        await using var coordinator = ClusterNode.Start(cfg, corpus, coordinator: true, worker: false, report: report);
        var batch = TestSupport.SmallConfig(("train.global-batch", "16"));
        await using (var node = ClusterNode.Start(batch, corpus, coordinator: false, worker: true, join: coordinator.Address))
        {
            var refused = Assert.IsType<RunOutcome.Refused>(await node.Stopped.WaitAsync(TimeSpan.FromSeconds(60)));
            Assert.Contains("train.GlobalBatch: 16 vs 8", refused.Reason);
        }
        var other = TextCorpus.FromText("other", "another corpus entirely, long enough to cut batches from. " + new string('x', 4000), cfg.Data.ValidationFraction, cfg.Model.Context);
        await using (var node = ClusterNode.Start(cfg, other, coordinator: false, worker: true, join: coordinator.Address))
        {
            var refused = Assert.IsType<RunOutcome.Refused>(await node.Stopped.WaitAsync(TimeSpan.FromSeconds(60)));
            Assert.StartsWith("run config differs: data:", refused.Reason);
        }
        Assert.False(coordinator.Result.IsCompleted);
    }

    [Fact]
    public async Task A_node_lost_before_the_first_plan_is_not_planned()
    {
        // Two nodes expected; the first to register goes away before the second arrives. The plan must be
        // made of the nodes present (the second and a third), never of the departed one.
        var cfg = TestSupport.SmallConfig(("cluster.nodes", "0"), ("cluster.expected-nodes", "2"), ("train.steps", "3"));
        var corpus = TextCorpus.Default(cfg.Data.ValidationFraction, cfg.Model.Context);
        var console = new ConsoleCapture();
        using var report = new TrainingReport(console, null);
        await using var coordinator = ClusterNode.Start(cfg, corpus, coordinator: true, worker: false, report: report);
        var early = ClusterNode.Start(cfg, corpus, coordinator: false, worker: true, join: coordinator.Address);
        var earlyAddress = early.Address.ToString();
        await console.WaitFor($"node {earlyAddress} joined", TimeSpan.FromSeconds(60));
        await early.DisposeAsync();
        await console.WaitFor($"node {earlyAddress} left the cluster before the first plan", TimeSpan.FromSeconds(60));
        await using var second = ClusterNode.Start(cfg, corpus, coordinator: false, worker: true, join: coordinator.Address);
        await using var third = ClusterNode.Start(cfg, corpus, coordinator: false, worker: true, join: coordinator.Address);
        var result = await coordinator.Result.WaitAsync(TimeSpan.FromMinutes(2));
        Assert.Equal(3, result.Steps.Count);
        var plan = Assert.Single(result.Plans);
        Assert.DoesNotContain(plan.Ranks, r => r.Worker.NodeAddress == earlyAddress);
        Assert.Equal(2, plan.Ranks.Count);
    }
}
