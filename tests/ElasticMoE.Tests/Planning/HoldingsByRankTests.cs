using ElasticMoE.Planning;
using static ElasticMoE.Tests.Planning.PlanningKit;

namespace ElasticMoE.Tests.Planning;

/// <summary>
/// <see cref="TrainingPlan.HoldingsByRank"/> (every rank at once, for the planners at scale) against the per-rank
/// <see cref="TrainingPlan.HoldingsOf"/> it replaces there: the same units in the same order, rank by rank.
/// </summary>
public sealed class HoldingsByRankTests
{
    public static TheoryData<int, int, int, int, bool> Layouts => new()
    {
        // workers, pp, devices per node, redundancy, replicated experts
        { 4, 1, 1, 0, false },
        { 4, 2, 1, 1, false },
        { 6, 3, 2, 1, false },
        { 8, 2, 4, 1, true },
        { 5, 1, 1, 1, true },
        { 6, 1, 3, 1, true },
        { 3, 1, 3, 1, false },   // one node: nobody to mirror on
        // r mirrors: several keepers per rank, each on a node of its own.
        { 5, 1, 1, 2, false },
        { 6, 2, 1, 2, false },
        { 6, 1, 2, 3, true },
        { 8, 1, 1, 3, true },
    };

    [Theory]
    [MemberData(nameof(Layouts))]
    public void Every_ranks_holdings_are_those_of_HoldingsOf_in_order(int workers, int pp, int devices, int redundancy, bool replicated)
    {
        var model = SmallModel(layers: 6, experts: 12);
        var slots = Enumerable.Range(0, workers).Select(i => Slot($"node{i / devices}", device: i % devices)).ToList();
        var plan = ElasticPlanner.Next(null, slots, workers, pp, model, 0, redundancy);
        if (replicated)
        {
            var rng = new Random(workers);
            var loads = Enumerable.Range(0, model.Layers - model.DenseLayers)
                .Select(_ => Enumerable.Range(0, 12).Select(_ => rng.NextDouble() * rng.NextDouble()).ToArray()).ToArray();
            var placement = RebalancePlanner.Plan(loads, plan.Workers.Select(s => s.Id).ToArray(), 12 / workers + 2, null, 0).Placement;
            plan = plan.WithPlacement(placement);
            Assert.NotNull(plan.Copies);
        }
        var all = plan.HoldingsByRank(model);
        Assert.Equal(workers, all.Length);
        for (int r = 0; r < workers; r++)
            Assert.Equal(plan.HoldingsOf(r, model).ToArray(), all[r]);
        if (redundancy > 0 && devices < workers)
            Assert.Contains(Enumerable.Range(0, workers), r => all[r].Length > plan.UnitsOf(r, model).Count());   // some mirrors were checked
    }

    [Fact]
    public void Failure_domains_give_the_same_holdings_either_way()
    {
        // Two racks of three nodes, DP 6: every dense unit is on six nodes but in two domains only, so with r = 2 the
        // planner mirrors by domain as well as by node.
        var model = SmallModel(layers: 5, experts: 12);
        var domains = Enumerable.Range(0, 6).ToDictionary(i => $"node{i}", i => i < 3 ? "rack-a" : "rack-b");
        foreach (int r in new[] { 1, 2 })
        {
            var plan = ElasticPlanner.Next(null, Workers(6), 6, 1, model, 0, r, domains);
            var all = plan.HoldingsByRank(model);
            for (int k = 0; k < plan.WorldSize; k++) Assert.Equal(plan.HoldingsOf(k, model).ToArray(), all[k]);
        }
    }

    [Fact]
    public void A_re_plan_after_a_loss_gives_the_same_holdings_either_way()
    {
        var model = SmallModel(layers: 5, experts: 10);
        var first = ElasticPlanner.Next(null, Workers(6), 6, 2, model, 0, redundancy: 1);
        var next = ElasticPlanner.Next(first, Workers(6).Where(s => s.Id.NodeAddress != "node2").ToList(), 4, 2, model, 1, redundancy: 1);
        var all = next.HoldingsByRank(model);
        for (int r = 0; r < next.WorldSize; r++) Assert.Equal(next.HoldingsOf(r, model).ToArray(), all[r]);
    }
}
