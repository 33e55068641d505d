using ElasticMoE.Planning;
using ElasticMoE.State;
using static ElasticMoE.Tests.Planning.PlanningKit;

namespace ElasticMoE.Tests.Planning;

/// <summary>Redundancy as the planners see it: who mirrors what, and how a loss is recovered from mirrors.</summary>
public class MirrorPlanningTests
{
    [Fact]
    public void Every_unit_without_a_copy_on_another_node_has_exactly_one_mirror_on_another_node()
    {
        var model = SmallModel();
        foreach (var (workers, pp) in new[] { (3, 1), (3, 3), (4, 2), (2, 2), (4, 4) })
        {
            var plan = ElasticPlanner.Next(null, Workers(workers), workers, pp, model, 1, redundancy: 1);
            var holders = plan.Holders(model);
            var mirrors = Enumerable.Range(0, workers).SelectMany(r => plan.MirrorsHeldBy(r, model).Select(m => (m.Unit, Keeper: r, m.Source))).ToList();
            foreach (var (unit, ranks) in holders)
            {
                bool single = ranks.Select(r => plan.Workers[r].NodeAddress).Distinct().Count() == 1;
                var of = mirrors.Where(m => m.Unit == unit).ToList();
                Assert.Equal(single ? 1 : 0, of.Count);
                foreach (var m in of)
                {
                    Assert.NotEqual(plan.Workers[m.Source].NodeAddress, plan.Workers[m.Keeper].NodeAddress);
                    Assert.Equal(m.Keeper, plan.BuddyOf(m.Source));
                    Assert.Contains(unit, plan.MirroredUnitsOf(m.Source, model));
                }
            }
        }
    }

    [Fact]
    public void No_mirrors_without_redundancy_or_without_another_node()
    {
        var model = SmallModel();
        var off = ElasticPlanner.Next(null, Workers(3), 3, 3, model, 1);
        Assert.Equal(0, off.Redundancy);
        Assert.All(Enumerable.Range(0, 3), r => Assert.Equal(-1, off.BuddyOf(r)));
        Assert.All(Enumerable.Range(0, 3), r => Assert.Empty(off.MirrorsHeldBy(r, model)));
        // Two devices of one node: a mirror on the same node would die with the original.
        var oneNode = ElasticPlanner.Next(null, [Slot("a", 0), Slot("a", 1)], 2, 2, model, 1, redundancy: 1);
        Assert.All(Enumerable.Range(0, 2), r => Assert.Equal(-1, oneNode.BuddyOf(r)));
        Assert.All(Enumerable.Range(0, 2), r => Assert.Empty(oneNode.MirroredUnitsOf(r, model)));
    }

    [Fact]
    public void Buddies_skip_workers_of_the_same_node()
    {
        var model = SmallModel();
        var slots = new[] { Slot("a", 0), Slot("a", 1), Slot("b", 0), Slot("b", 1) };
        var plan = ElasticPlanner.Next(null, slots, 4, 1, model, 1, redundancy: 1);
        for (int r = 0; r < 4; r++)
            Assert.NotEqual(plan.Workers[r].NodeAddress, plan.Workers[plan.BuddyOf(r)].NodeAddress);
        // DP 4 over two nodes: dense units have copies on the other node; only experts are mirrored.
        Assert.All(Enumerable.Range(0, 4), r => Assert.All(plan.MirroredUnitsOf(r, model), u => Assert.Equal(UnitKind.Expert, u.Kind)));
    }

    [Theory]
    [InlineData(3, 1, 1)]
    [InlineData(3, 3, 0)]
    [InlineData(3, 3, 2)]
    [InlineData(4, 2, 3)]
    public void Losing_any_one_node_loses_nothing_and_the_buddy_keeps_the_lost_experts(int workers, int pp, int victim)
    {
        var model = SmallModel();
        var plan = ElasticPlanner.Next(null, Workers(workers), workers, pp, model, 1, redundancy: 1);
        var gone = plan.Workers[victim].Id;
        var survivors = plan.Workers.Where(w => w.Id != gone).ToList();
        int left = workers - 1;
        int nextPp = Enumerable.Range(1, Math.Min(pp, left)).Reverse().First(p => left % p == 0);
        var next = ElasticPlanner.Next(plan, survivors, left, nextPp, model, 2, redundancy: 1);
        AssertValid(next, model);
        var transfer = TransferPlanner.Between(plan, next, model, [gone]);
        Assert.All(transfer.Moves, m => Assert.NotEqual(gone, m.From));
        // The victim's experts live on only in its buddy's mirrors: whatever of them moves comes from there,
        // and the buddy keeps as many of them as its balanced share leaves room for (no transfer for those).
        var buddy = plan.Workers[plan.BuddyOf(victim)].Id;
        int kept = 0;
        for (int layer = 0; layer < plan.ExpertOwner.Length; layer++)
            foreach (var e in plan.ExpertsOn(layer, victim))
            {
                var unit = UnitId.OfExpert(layer + model.DenseLayers, e);
                if (OwnerId(next, layer, e) == buddy) kept++;
                Assert.All(transfer.Moves.Where(m => m.Unit == unit && next.RankOf(m.To) == next.ExpertOwner[layer][e]), m => Assert.Equal(buddy, m.From));
            }
        Assert.True(kept > 0, "the buddy should keep some of the lost experts in place");
        // And the next plan is itself protected: every unit it needs is held or moved, mirrors included.
        var after = next.Holders(model);
        Assert.Equal(UnitCatalog.All(model), after.Keys.Order());
    }

    [Fact]
    public void Without_mirrors_a_lost_expert_is_named()
    {
        var model = SmallModel();
        var plan = ElasticPlanner.Next(null, Workers(3), 3, 1, model, 1);
        var gone = plan.Workers[1].Id;
        var next = ElasticPlanner.Next(plan, plan.Workers.Where(w => w.Id != gone).ToList(), 2, 1, model, 2);
        var ex = Assert.Throws<UnitsLostException>(() => TransferPlanner.Between(plan, next, model, [gone]));
        Assert.All(ex.Units, u => Assert.Equal(UnitKind.Expert, u.Kind));
        Assert.Equal(plan.UnitsOf(1, model).Where(u => u.Kind == UnitKind.Expert).Order(), ex.Units);
    }

    [Fact]
    public void A_new_plan_places_its_mirrors_by_transfers_and_holdings_include_them()
    {
        var model = SmallModel();
        var plan = ElasticPlanner.Next(null, Workers(2), 2, 2, model, 1, redundancy: 1);
        var grown = ElasticPlanner.Next(plan, Workers(3), 3, 3, model, 2, redundancy: 1);
        var transfer = TransferPlanner.Between(plan, grown, model);
        for (int r = 0; r < grown.WorldSize; r++)
        {
            var id = grown.Workers[r].Id;
            int before = plan.RankOf(id);
            var had = before < 0 ? new HashSet<UnitId>() : plan.HoldingsOf(before, model).ToHashSet();
            var arriving = transfer.Moves.Where(m => m.To == id).Select(m => m.Unit);
            Assert.Equal(grown.HoldingsOf(r, model).Order(), had.Intersect(grown.HoldingsOf(r, model)).Concat(arriving).Order());
        }
    }
}
