using ElasticMoE.Planning;
using ElasticMoE.State;
using static ElasticMoE.Tests.Planning.PlanningKit;

namespace ElasticMoE.Tests.Planning;

public class ElasticPlannerTests
{
    [Theory]
    [InlineData(6, 6, 2)]
    [InlineData(6, 4, 2)]
    [InlineData(3, 3, 3)]
    [InlineData(5, 1, 1)]
    public void The_first_plan_is_the_layout_planners_plan_over_the_lowest_worker_ids(int available, int workers, int pp)
    {
        var model = SmallModel();
        var plan = ElasticPlanner.Next(null, Shuffled(Workers(available), seed: 7), workers, pp, model, epoch: 3);
        var expected = LayoutPlanner.Plan(3, Workers(available).Take(workers).ToList(), pp, model);
        Assert.True(plan.SameLayout(expected));
        Assert.Equal(3, plan.Epoch);
    }

    [Fact]
    public void The_issue_sequence_keeps_every_expert_whose_owner_survives_under_its_cap()
    {
        // 4 workers as 4x1, then 4x2, 4x4, 2x1, 3x1: the scripted schedule of the elasticity issue.
        var model = SmallModel();
        var available = Workers(4);
        var plan = ElasticPlanner.Next(null, available, 4, 1, model, epoch: 0);
        int epoch = 0;
        foreach (var (workers, pp) in new[] { (4, 2), (4, 4), (2, 1), (3, 1) })
        {
            var next = ElasticPlanner.Next(plan, available, workers, pp, model, ++epoch);
            AssertValid(next, model);
            Assert.Equal((workers / pp, pp, epoch), (next.Dp, next.Pp, next.Epoch));
            AssertExpertsKeptWherePossible(plan, next);
            plan = next;
        }
    }

    [Fact]
    public void Changing_only_the_pipeline_degree_keeps_every_expert_and_every_dense_unit_in_place()
    {
        var model = SmallModel();
        var available = Workers(4);
        var dp4 = ElasticPlanner.Next(null, available, 4, 1, model, 0);
        var dp2pp2 = ElasticPlanner.Next(dp4, available, 4, 2, model, 1);
        var pp4 = ElasticPlanner.Next(dp2pp2, available, 4, 4, model, 2);
        foreach (var (before, after) in new[] { (dp4, dp2pp2), (dp2pp2, pp4) })
        {
            var held = Holdings(before, model);
            for (int r = 0; r < after.WorldSize; r++)
                Assert.Subset(held[after.Workers[r].Id], after.UnitsOf(r, model).ToHashSet());
        }
        // 4x2 → 4x4: whoever held stage 0 of two (embedding, blocks 0-1) takes stage 0 of four, and so on.
        Assert.Equal(dp2pp2.Workers[0], pp4.Workers[0]);
        Assert.Equal(dp2pp2.Workers[1], pp4.Workers[3]);
    }

    [Fact]
    public void A_same_layout_re_plan_changes_nothing_but_the_epoch()
    {
        var model = SmallModel();
        var available = Workers(5);
        var first = ElasticPlanner.Next(null, available, 4, 2, model, 0);
        var again = ElasticPlanner.Next(first, Shuffled(available, 3), 4, 2, model, 1);
        Assert.True(again.SameLayout(first));
        Assert.Equal(1, again.Epoch);

        // Also from a layout the round-robin would not produce (after shrinking and growing).
        var three = ElasticPlanner.Next(first, available.Take(3).ToList(), 3, 1, model, 2);
        var four = ElasticPlanner.Next(three, available, 4, 1, model, 3);
        Assert.True(ElasticPlanner.Next(four, Shuffled(available, 5), 4, 1, model, 4).SameLayout(four));
    }

    [Fact]
    public void Survivors_come_first_in_their_old_rank_order_then_newcomers_by_id()
    {
        var model = SmallModel();
        var first = ElasticPlanner.Next(null, Workers(4), 4, 1, model, 0);
        // node0 and node2 are gone; node9 and node5 are new.
        var available = new[] { Slot("node9"), Slot("node3"), Slot("node5"), Slot("node1") };
        var next = ElasticPlanner.Next(first, available, 3, 1, model, 1);
        Assert.Equal(new[] { "node1", "node3", "node5" }, next.Workers.Select(w => w.NodeAddress));
        AssertValid(next, model);
        AssertExpertsKeptWherePossible(first, next);
    }

    [Fact]
    public void A_returning_node_with_a_new_incarnation_is_a_new_worker()
    {
        var model = SmallModel();
        var first = ElasticPlanner.Next(null, Workers(2), 2, 1, model, 0);
        var reborn = new[] { Slot("node0", uid: 2), Slot("node1") };
        var next = ElasticPlanner.Next(first, reborn, 2, 1, model, 1);
        Assert.Equal(new[] { Slot("node1"), Slot("node0", uid: 2) }, next.Workers);
    }

    [Fact]
    public void The_slot_of_the_available_list_is_used_so_a_new_endpoint_is_picked_up()
    {
        var model = SmallModel();
        var first = ElasticPlanner.Next(null, Workers(2), 2, 1, model, 0);
        var moved = new WorkerSlot(first.Workers[1].Id, "10.0.0.7:9999");
        var next = ElasticPlanner.Next(first, new[] { first.Workers[0], moved }, 2, 1, model, 1);
        Assert.Equal("10.0.0.7:9999", next.Workers[1].DataEndpoint);
    }

    [Fact]
    public void Shuffled_available_gives_the_same_plan()
    {
        var model = SmallModel();
        var pool = Workers(6).Concat(new[] { Slot("node1", device: 1), Slot("nodeX", uid: 3) }).ToList();
        var reference = Sequence(pool);
        for (int seed = 1; seed <= 5; seed++)
        {
            var shuffled = Sequence(Shuffled(pool, seed));
            Assert.Equal(reference.Count, shuffled.Count);
            for (int i = 0; i < reference.Count; i++) Assert.True(reference[i].SameLayout(shuffled[i]), $"plan {i} differs for seed {seed}");
        }

        List<TrainingPlan> Sequence(IReadOnlyList<WorkerSlot> available)
        {
            var plans = new List<TrainingPlan> { ElasticPlanner.Next(null, available, 4, 2, model, 0) };
            foreach (var (w, pp) in new[] { (6, 3), (8, 4), (3, 1), (7, 1), (4, 4) })
                plans.Add(ElasticPlanner.Next(plans[^1], available, w, pp, model, plans.Count));
            return plans;
        }
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(3)]
    public void Random_re_plans_stay_valid_balanced_and_keep_experts_where_possible(int seed)
    {
        var model = SmallModel(layers: 5, experts: 7);
        var rng = new Random(seed);
        var pool = Enumerable.Range(0, 10).SelectMany(n => new[] { Slot($"n{n}", 0), Slot($"n{n}", 1) }).ToList();
        TrainingPlan? plan = null;
        for (int epoch = 0; epoch < 60; epoch++)
        {
            var available = pool.Where(_ => rng.NextDouble() < 0.6).ToList();
            if (available.Count == 0) continue;
            int workers = rng.Next(1, available.Count + 1);
            var pps = Enumerable.Range(1, Math.Min(workers, model.Layers)).Where(p => workers % p == 0).ToList();
            int pp = pps[rng.Next(pps.Count)];
            var next = ElasticPlanner.Next(plan, Shuffled(available, epoch), workers, pp, model, epoch);
            AssertValid(next, model);
            Assert.All(next.Workers, w => Assert.Contains(w, available));
            if (plan is not null) AssertExpertsKeptWherePossible(plan, next);
            plan = next;
        }
    }

    [Fact]
    public void Impossible_requests_are_refused_with_the_reason()
    {
        var model = SmallModel(layers: 3);
        var four = Workers(4);
        string Refusal(Action a) => Assert.Throws<ArgumentException>(a).Message;
        Assert.Contains("at least one worker", Refusal(() => ElasticPlanner.Next(null, four, 0, 1, model, 0)));
        Assert.Contains("only 4 are available", Refusal(() => ElasticPlanner.Next(null, four, 5, 1, model, 0)));
        Assert.Contains("must divide", Refusal(() => ElasticPlanner.Next(null, four, 4, 3, model, 0)));
        Assert.Contains("must divide", Refusal(() => ElasticPlanner.Next(null, four, 4, 0, model, 0)));
        Assert.Contains("exceeds the number of layers", Refusal(() => ElasticPlanner.Next(null, four, 4, 4, model, 0)));
        Assert.Contains("at most 4096 workers (data-plane tags carry a 12-bit rank)",
            Refusal(() => ElasticPlanner.Next(null, Workers(4098), 4097, 1, model, 0)));
        var twice = new[] { Slot("a"), Slot("b"), Slot("a") };
        Assert.Contains("more than once", Refusal(() => ElasticPlanner.Next(null, twice, 2, 1, model, 0)));
        var otherModel = ElasticPlanner.Next(null, four, 4, 1, SmallModel(layers: 3, experts: 4), 0);
        Assert.Contains("different model", Refusal(() => ElasticPlanner.Next(otherModel, four, 4, 1, model, 1)));
        Assert.Equal(4096, ElasticPlanner.Next(null, Workers(4096), 4096, 1, model, 0).WorldSize);
    }

    [Fact]
    public void More_workers_than_experts_leaves_some_workers_without_experts_of_a_layer()
    {
        var model = SmallModel(experts: 4);
        var first = ElasticPlanner.Next(null, Workers(3), 3, 1, model, 0);
        var next = ElasticPlanner.Next(first, Workers(6), 6, 1, model, 1);
        AssertValid(next, model);
        AssertExpertsKeptWherePossible(first, next);
        Assert.All(next.ExpertOwner, row => Assert.Equal(4, row.Distinct().Count()));
        Assert.Equal(UnitCatalog.All(model).Count(u => u.Kind == UnitKind.Expert), next.Holders(model).Count(kv => kv.Key.Kind == UnitKind.Expert));
    }
}
