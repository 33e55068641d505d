using ElasticMoE.Configuration;

namespace ElasticMoE.Tests.Planning;

/// <summary>The <c>rebalance</c> section of the config, as the placement planner reads it.</summary>
public class RebalanceConfigPlacementTests
{
    [Fact]
    public void Defaults_are_off_with_one_redundant_slot()
    {
        Assert.Equal(new RebalanceOptions(0, 1, 0.1, 20, 1.10, 0.05), ConfigLoader.Load().Rebalance);
        Assert.Equal(new RebalanceOptions(10, 2, 3, 5, 1.2, 0.1), ConfigLoader.Load(null, [
            new("rebalance.every", "10"), new("rebalance.redundant-slots", "2"), new("rebalance.churn-budget", "3"),
            new("rebalance.window", "5"), new("rebalance.threshold", "1.2"), new("rebalance.hysteresis", "0.1")]).Rebalance);
    }

    [Theory]
    [InlineData("rebalance.every", "-1")]
    [InlineData("rebalance.redundant-slots", "-1")]
    [InlineData("rebalance.churn-budget", "0")]
    [InlineData("rebalance.churn-budget", "-0.1")]
    [InlineData("rebalance.churn-budget", "2.5")]
    [InlineData("rebalance.window", "0")]
    [InlineData("rebalance.threshold", "0.9")]
    [InlineData("rebalance.hysteresis", "-0.01")]
    [InlineData("rebalance.every", "often")]
    public void An_impossible_setting_names_its_key(string key, string value)
    {
        var ex = Assert.Throws<ConfigException>(() => ConfigLoader.Load(null, [new(key, value)]));
        Assert.Contains($"elasticmoe.{key}", ex.Message);
    }

    [Fact]
    public void Fewer_slots_than_experts_is_a_config_error_naming_redundant_slots()
    {
        // 8 experts on 3 nodes: 2 slots each without a redundant one, 6 < 8.
        var ex = Assert.Throws<ConfigException>(() => ConfigLoader.Load(null, [new("rebalance.redundant-slots", "0"), new("cluster.nodes", "3")]));
        Assert.Contains("elasticmoe.rebalance.redundant-slots", ex.Message);
        Assert.Equal(0, ConfigLoader.Load(null, [new("rebalance.redundant-slots", "0"), new("cluster.nodes", "4")]).Rebalance.RedundantSlots);
    }

    [Fact]
    public void The_runtime_checks_a_layout_it_learns_later()
    {
        var none = RebalanceOptions.Default with { RedundantSlots = 0 };
        none.Validate(experts: 8, workers: 4);
        var ex = Assert.Throws<ConfigException>(() => none.Validate(experts: 8, workers: 3));
        Assert.Contains("elasticmoe.rebalance.redundant-slots", ex.Message);
        RebalanceOptions.Default.Validate(experts: 8, workers: 3);
        RebalanceOptions.Default.Validate(experts: 4, workers: 16);
    }

    [Fact]
    public void Slots_and_budget_in_copies()
    {
        var o = RebalanceOptions.Default with { RedundantSlots = 2 };
        Assert.Equal(10, o.SlotsPerWorker(64, 8));
        Assert.Equal(4, o.SlotsPerWorker(8, 3));
        Assert.Equal(8, o.CopiesPerRebalance(80));
        Assert.Equal(1, o.CopiesPerRebalance(5));
        Assert.Equal(3, (o with { ChurnBudget = 3 }).CopiesPerRebalance(80));
    }
}
