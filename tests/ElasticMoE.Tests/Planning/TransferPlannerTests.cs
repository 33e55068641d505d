using ElasticMoE.Configuration;
using ElasticMoE.Planning;
using ElasticMoE.State;
using static ElasticMoE.Tests.Planning.PlanningKit;

namespace ElasticMoE.Tests.Planning;

public class TransferPlannerTests
{
    /// <summary>
    /// Plays a transfer plan on the previous holdings: every move must come from a worker that held the
    /// unit, and after the moves and then the drops every worker must hold exactly what the next plan gives it.
    /// </summary>
    private static void AssertTransfersReach(TrainingPlan previous, TrainingPlan next, TransferPlan transfer, ModelOptions model)
    {
        var before = Holdings(previous, model);
        var state = before.ToDictionary(kv => kv.Key, kv => kv.Value.ToHashSet());
        foreach (var move in transfer.Moves)
        {
            Assert.True(before.TryGetValue(move.From, out var had) && had.Contains(move.Unit), $"{move.From} never held {move.Unit}");
            if (!state.TryGetValue(move.To, out var set)) state[move.To] = set = new HashSet<UnitId>();
            Assert.True(set.Add(move.Unit), $"{move.To} is sent {move.Unit} it already has");
        }
        foreach (var (worker, units) in transfer.Drops)
            foreach (var u in units) Assert.True(state[worker].Remove(u), $"{worker} drops {u} it does not hold");
        var after = Holdings(next, model);
        foreach (var (worker, units) in state)
            Assert.True(units.SetEquals(after.GetValueOrDefault(worker) ?? new HashSet<UnitId>()),
                $"{worker} ends with [{string.Join(", ", units.Order())}]");
        // Only what must move moves: one transfer per (worker, unit) the next plan adds.
        int needed = after.Sum(kv => kv.Value.Count(u => !(before.GetValueOrDefault(kv.Key)?.Contains(u) ?? false)));
        Assert.Equal(needed, transfer.Moves.Count);
        // Ordered by receiver, then unit.
        Assert.Equal(transfer.Moves.OrderBy(m => m.To).ThenBy(m => m.Unit), transfer.Moves);
    }

    private static HashSet<UnitId> UnitsOf(TrainingPlan plan, WorkerId id, ModelOptions model)
        => plan.UnitsOf(plan.RankOf(id), model).ToHashSet();

    [Fact]
    public void A_same_layout_re_plan_moves_nothing_and_drops_nothing()
    {
        var model = SmallModel();
        var first = ElasticPlanner.Next(null, Workers(4), 4, 2, model, 0);
        var again = ElasticPlanner.Next(first, Workers(4), 4, 2, model, 1);
        var transfer = TransferPlanner.Between(first, again, model);
        Assert.Empty(transfer.Moves);
        Assert.Empty(transfer.Drops);
        Assert.True(transfer.IsEmpty);
    }

    [Fact]
    public void The_issue_sequence_moves_only_what_must_move()
    {
        var model = SmallModel();
        var available = Workers(4);
        var plan = ElasticPlanner.Next(null, available, 4, 1, model, 0);
        var moveCounts = new List<int>();
        foreach (var (workers, pp) in new[] { (4, 2), (4, 4), (2, 1), (3, 1) })
        {
            var next = ElasticPlanner.Next(plan, available, workers, pp, model, plan.Epoch + 1);
            var transfer = TransferPlanner.Between(plan, next, model);
            AssertTransfersReach(plan, next, transfer, model);
            moveCounts.Add(transfer.Moves.Count);
            plan = next;
        }
        // 4x1 → 4x2 → 4x4 only narrows each worker's slice: nothing is sent, slices are dropped.
        Assert.Equal(0, moveCounts[0]);
        Assert.Equal(0, moveCounts[1]);
        Assert.True(moveCounts[2] > 0 && moveCounts[3] > 0);
    }

    [Fact]
    public void Narrowing_the_slice_drops_the_blocks_of_the_other_stage()
    {
        var model = SmallModel();
        var dp4 = ElasticPlanner.Next(null, Workers(4), 4, 1, model, 0);
        var pp2 = ElasticPlanner.Next(dp4, Workers(4), 4, 2, model, 1);
        var transfer = TransferPlanner.Between(dp4, pp2, model);
        Assert.Empty(transfer.Moves);
        // Ranks 0 and 2 run stage 0 (blocks 0-1), ranks 1 and 3 stage 1 (blocks 2-3).
        var stage0 = UnitCatalog.StageUnits(model, 0, 2).Order().ToArray();
        var stage1 = UnitCatalog.StageUnits(model, 2, 4).Order().ToArray();
        for (int r = 0; r < 4; r++)
            Assert.Equal(r % 2 == 0 ? stage1 : stage0, transfer.Drops[pp2.Workers[r].Id]);
    }

    [Fact]
    public void Dropping_a_worker_moves_exactly_its_experts_when_its_slice_is_replicated()
    {
        var model = SmallModel();
        var dp4 = ElasticPlanner.Next(null, Workers(4), 4, 1, model, 0);
        var leaver = dp4.Workers[3].Id;
        var three = ElasticPlanner.Next(dp4, Workers(3), 3, 1, model, 1);
        var transfer = TransferPlanner.Between(dp4, three, model);
        AssertTransfersReach(dp4, three, transfer, model);
        var leaversExperts = UnitsOf(dp4, leaver, model).Where(u => u.Kind == UnitKind.Expert).Order();
        Assert.Equal(leaversExperts, transfer.Moves.Select(m => m.Unit).Order());
        Assert.All(transfer.Moves, m => Assert.Equal(leaver, m.From));
    }

    [Fact]
    public void Dropping_the_only_holder_of_a_stage_moves_its_slice_and_its_experts()
    {
        var model = SmallModel();
        var pipeline = ElasticPlanner.Next(null, Workers(2), 2, 2, model, 0);   // DP 1: one copy of each stage
        var leaver = pipeline.Workers[1].Id;
        var alone = ElasticPlanner.Next(pipeline, Workers(2), 1, 1, model, 1);
        Assert.Equal(pipeline.Workers[0], Assert.Single(alone.Workers));
        var transfer = TransferPlanner.Between(pipeline, alone, model);
        AssertTransfersReach(pipeline, alone, transfer, model);
        Assert.Equal(UnitsOf(pipeline, leaver, model).Order(), transfer.Moves.Select(m => m.Unit));
        Assert.All(transfer.Moves, m => Assert.Equal((leaver, pipeline.Workers[0].Id), (m.From, m.To)));
    }

    [Fact]
    public void A_worker_not_in_the_next_plan_drops_everything_it_held()
    {
        var model = SmallModel();
        var first = ElasticPlanner.Next(null, Workers(4), 4, 2, model, 0);
        var next = ElasticPlanner.Next(first, Workers(4), 2, 1, model, 1);
        var transfer = TransferPlanner.Between(first, next, model);
        AssertTransfersReach(first, next, transfer, model);
        foreach (var slot in first.Workers.Where(w => next.RankOf(w.Id) < 0))
            Assert.Equal(UnitsOf(first, slot.Id, model).Order(), transfer.Drops[slot.Id]);
        Assert.Equal(2, first.Workers.Count(w => next.RankOf(w.Id) < 0));
    }

    [Fact]
    public void Units_whose_only_holder_died_are_lost_and_named()
    {
        var model = SmallModel();
        var pipeline = ElasticPlanner.Next(null, Workers(2), 2, 2, model, 0);
        var dead = pipeline.Workers[1].Id;
        var alone = ElasticPlanner.Next(pipeline, Workers(1), 1, 1, model, 1);
        var ex = Assert.Throws<UnitsLostException>(() => TransferPlanner.Between(pipeline, alone, model, new[] { dead }));
        Assert.Equal(UnitsOf(pipeline, dead, model).Order(), ex.Units);
        Assert.Contains("head", ex.Message);
        Assert.Contains("block.3", ex.Message);
        Assert.Contains($"{ex.Units.Count} unit(s)", ex.Message);

        // With a replica of every stage, a death loses only the dead worker's experts.
        var replicated = ElasticPlanner.Next(null, Workers(4), 4, 2, model, 0);
        var gone = replicated.Workers[3].Id;
        var survivors = ElasticPlanner.Next(replicated, Workers(3), 3, 1, model, 1);
        var lost = Assert.Throws<UnitsLostException>(() => TransferPlanner.Between(replicated, survivors, model, new[] { gone }));
        Assert.Equal(UnitsOf(replicated, gone, model).Where(u => u.Kind == UnitKind.Expert).Order(), lost.Units);
    }

    [Fact]
    public void Units_no_previous_worker_ever_held_are_lost()
    {
        // The next plan is for a model with more experts than the previous one placed.
        var small = SmallModel(experts: 4);
        var large = SmallModel(experts: 6);
        var before = LayoutPlanner.Plan(0, Workers(2), 1, small);
        var after = LayoutPlanner.Plan(1, Workers(2), 1, large);
        var ex = Assert.Throws<UnitsLostException>(() => TransferPlanner.Between(before, after, large));
        var expected = Enumerable.Range(large.DenseLayers, large.Layers - large.DenseLayers)
            .SelectMany(b => new[] { UnitId.OfExpert(b, 4), UnitId.OfExpert(b, 5) }).Order();
        Assert.Equal(expected, ex.Units);
        Assert.Contains("expert.1.4", ex.Message);
    }

    [Fact]
    public void Dead_workers_send_nothing_and_cannot_be_in_the_next_plan()
    {
        // One MoE layer of 2 experts over 4 workers: node2 and node3 hold no expert, so their death loses nothing.
        var model = SmallModel(layers: 2, experts: 2);
        var dp4 = ElasticPlanner.Next(null, Workers(4), 4, 1, model, 0);
        var gone = Slot("node3").Id;
        Assert.DoesNotContain(UnitsOf(dp4, gone, model), u => u.Kind == UnitKind.Expert);
        var available = Workers(3).Append(Slot("node4")).ToList();
        var next = ElasticPlanner.Next(dp4, available, 4, 1, model, 1);
        var transfer = TransferPlanner.Between(dp4, next, model, new[] { gone });
        Assert.Equal(UnitsOf(next, Slot("node4").Id, model).Order(), transfer.Moves.Select(m => m.Unit));
        Assert.All(transfer.Moves, m => Assert.NotEqual(gone, m.From));
        Assert.False(transfer.Drops.ContainsKey(gone));
        // Without the death node3 is a sender like the others.
        Assert.Contains(TransferPlanner.Between(dp4, next, model).Moves, m => m.From == gone);
        Assert.Contains("is gone", Assert.Throws<ArgumentException>(() => TransferPlanner.Between(dp4, dp4, model, new[] { gone })).Message);
    }

    [Fact]
    public void A_receiver_is_sent_from_its_own_node_when_it_can_be()
    {
        var model = SmallModel();
        var a = Slot("nodeA");
        var b0 = Slot("nodeB");
        var b1 = Slot("nodeB", device: 1);
        var before = ElasticPlanner.Next(null, new[] { a, b0 }, 2, 1, model, 0);
        var after = ElasticPlanner.Next(before, new[] { a, b0, b1 }, 3, 1, model, 1);
        var transfer = TransferPlanner.Between(before, after, model);
        AssertTransfersReach(before, after, transfer, model);
        var dense = transfer.Moves.Where(m => m.To == b1.Id && m.Unit.Kind != UnitKind.Expert).ToList();
        Assert.Equal(UnitCatalog.StageUnits(model, 0, model.Layers).Count(), dense.Count);
        Assert.All(dense, m => Assert.Equal(b0.Id, m.From));
    }

    [Fact]
    public void Replicated_units_are_sent_by_holders_in_turn()
    {
        var model = SmallModel();
        var a = Slot("nodeA");
        var b = Slot("nodeB");
        var c = Slot("nodeC");
        var before = ElasticPlanner.Next(null, new[] { a, b }, 2, 1, model, 0);
        var after = ElasticPlanner.Next(before, new[] { a, b, c }, 3, 1, model, 1);
        var transfer = TransferPlanner.Between(before, after, model);
        AssertTransfersReach(before, after, transfer, model);
        int fromA = transfer.Moves.Count(m => m.From == a.Id), fromB = transfer.Moves.Count(m => m.From == b.Id);
        Assert.True(Math.Abs(fromA - fromB) <= 1, $"A sends {fromA}, B sends {fromB}");
        // The first dense units alternate, lowest WorkerId first.
        Assert.Equal(new[] { a.Id, b.Id, a.Id }, transfer.Moves.Take(3).Select(m => m.From));
    }

    [Fact]
    public void The_same_plans_give_the_same_transfers()
    {
        var model = SmallModel();
        var before = ElasticPlanner.Next(null, Workers(6), 6, 2, model, 0);
        var after = ElasticPlanner.Next(before, Shuffled(Workers(8).Skip(2), 1), 4, 4, model, 1);
        var x = TransferPlanner.Between(before, after, model);
        var y = TransferPlanner.Between(before, after, model);
        Assert.Equal(x.Moves, y.Moves);
        Assert.Equal(x.Drops.Keys, y.Drops.Keys);
        foreach (var k in x.Drops.Keys) Assert.Equal(x.Drops[k], y.Drops[k]);
        AssertTransfersReach(before, after, x, model);
    }

    [Theory]
    [InlineData(11)]
    [InlineData(12)]
    public void Random_re_plans_transfer_exactly_the_difference(int seed)
    {
        var model = SmallModel(layers: 5, experts: 6);
        var rng = new Random(seed);
        var pool = Enumerable.Range(0, 6).SelectMany(n => new[] { Slot($"n{n}", 0), Slot($"n{n}", 1) }).ToList();
        var plan = ElasticPlanner.Next(null, pool, 4, 2, model, 0);
        for (int epoch = 1; epoch < 40; epoch++)
        {
            var available = pool.Where(_ => rng.NextDouble() < 0.7).ToList();
            if (available.Count == 0) continue;
            int workers = rng.Next(1, available.Count + 1);
            var pps = Enumerable.Range(1, Math.Min(workers, model.Layers)).Where(p => workers % p == 0).ToList();
            var next = ElasticPlanner.Next(plan, available, workers, pps[rng.Next(pps.Count)], model, epoch);
            AssertTransfersReach(plan, next, TransferPlanner.Between(plan, next, model), model);
            plan = next;
        }
    }
}
