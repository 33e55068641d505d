using ElasticMoE.Planning;
using ElasticMoE.Runtime.Coordination;
using static ElasticMoE.Tests.Planning.PlanningKit;

namespace ElasticMoE.Tests.Planning;

/// <summary>When a plan is below its redundancy: some unit on fewer nodes than cluster.redundancy + 1.</summary>
public class RedundancyCheckTests
{
    [Fact]
    public void One_node_is_below_redundancy_1_and_two_meet_it()
    {
        var model = SmallModel();
        var alone = RedundancyCheck.Of(ElasticPlanner.Next(null, Workers(1), 1, 1, model, 1, redundancy: 1), model, 1);
        Assert.False(alone.Met);
        Assert.Equal((2, 1, 1), (alone.Wanted, alone.Fewest, alone.Nodes));
        Assert.Equal(ElasticPlanner.Next(null, Workers(1), 1, 1, model, 1, redundancy: 1).HoldingsOf(0, model).Count(), alone.Below.Count);
        Assert.Contains("below redundancy 1", alone.Describe());

        foreach (var (workers, pp) in new[] { (2, 1), (3, 1), (4, 2), (2, 2) })
        {
            var check = RedundancyCheck.Of(ElasticPlanner.Next(null, Workers(workers), workers, pp, model, 1, redundancy: 1), model, 1);
            Assert.True(check.Met, $"{workers}x{pp}: {check.Describe()}");
            Assert.Null(check.Describe());
            Assert.True(check.Fewest >= 2);
        }
    }

    [Fact]
    public void Without_redundancy_nothing_is_below_it_and_two_workers_on_one_node_are_one_copy()
    {
        var model = SmallModel();
        Assert.True(RedundancyCheck.Of(ElasticPlanner.Next(null, Workers(1), 1, 1, model, 1), model, 0).Met);
        // Two devices of one node: the mirrors have no other node to go to.
        var oneNode = new List<WorkerSlot> { Slot("node0", 0), Slot("node0", 1) };
        var check = RedundancyCheck.Of(ElasticPlanner.Next(null, oneNode, 2, 1, model, 1, redundancy: 1), model, 1);
        Assert.False(check.Met);
        Assert.Equal(1, check.Nodes);
    }
}
