using ElasticMoE.Planning;

namespace ElasticMoE.Tests.Planning;

public class ExpertPlacementTests
{
    private static readonly WorkerId A = new("a", 1, 0), B = new("b", 1, 0), C = new("c", 1, 0);

    [Fact]
    public void Copies_are_kept_by_identity_in_ascending_order()
    {
        var p = new ExpertPlacement([C, A, B], [[[B, A], [C]]]);
        Assert.Equal([A, B, C], p.Workers);
        Assert.Equal([A, B], p.CopiesOf(0, 0));
        Assert.Equal([0], p.ExpertsOf(0, A));
        Assert.Equal([1], p.ExpertsOf(0, C));
        Assert.Equal(3, p.TotalCopies);
        Assert.Equal(new ExpertPlacement([A, B, C], [[[A, B], [C]]]), p);
        Assert.NotEqual(new ExpertPlacement([A, B, C], [[[A], [C]]]), p);
    }

    [Fact]
    public void An_expert_splits_its_load_evenly_over_its_copies_and_idle_workers_count_in_the_mean()
    {
        var p = new ExpertPlacement([A, B, C], [[[A, B], [A]]]);
        double[] loads = [6, 1];
        Assert.Equal([4, 3, 0], p.WorkerLoads(0, loads));
        Assert.Equal(4, p.MaxLoad(0, loads));
        Assert.Equal(7.0 / 3, p.MeanLoad(0, loads), 12);
        Assert.Equal(4 / (7.0 / 3), p.MaxOverMean([loads]), 12);
    }

    [Fact]
    public void Max_over_mean_sums_the_busiest_workers_of_the_layers_that_run_in_sequence()
    {
        var p = new ExpertPlacement([A, B], [[[A], [B]], [[A], [A]]]);
        // Layer 0: loads 3 and 1 (max 3, mean 2); layer 1: 4 and 0 (max 4, mean 2).
        Assert.Equal(7.0 / 4, p.MaxOverMean([[3, 1], [2, 2]]), 12);
    }

    [Fact]
    public void A_malformed_placement_is_refused()
    {
        Assert.Throws<ArgumentException>(() => new ExpertPlacement([A, B], [[[A], []]]));
        Assert.Throws<ArgumentException>(() => new ExpertPlacement([A, B], [[[A, A]]]));
        Assert.Throws<ArgumentException>(() => new ExpertPlacement([A, B], [[[C]]]));
        Assert.Throws<ArgumentException>(() => new ExpertPlacement([A, A], [[[A]]]));
    }

    [Fact]
    public void A_copy_is_moved_when_its_layer_expert_and_worker_are_new()
    {
        var before = new ExpertPlacement([A, B, C], [[[A], [B, C]], [[A], [B]]]);
        // Layer 0: expert 0 gains a copy on B, expert 1 drops C (free); layer 1: expert 1 moves from B to C.
        var after = new ExpertPlacement([A, B, C], [[[A, B], [B]], [[A], [C]]]);
        Assert.Equal([new ExpertCopyMove(0, 0, A, B), new ExpertCopyMove(1, 1, B, C)], after.MovesFrom(before));
        Assert.Equal(2, after.CopiesMovedFrom(before));
        Assert.Equal(0, before.CopiesMovedFrom(before));
        Assert.Throws<ArgumentException>(() => after.MovesFrom(new ExpertPlacement([A], [[[A], [A]]])));
    }

    [Fact]
    public void A_moved_copy_is_sent_by_a_holder_that_is_still_there()
    {
        var before = new ExpertPlacement([A, B, C], [[[A, B]]]);
        var after = new ExpertPlacement([B, C], [[[C]]]);
        Assert.Equal([new ExpertCopyMove(0, 0, B, C)], after.MovesFrom(before));
    }

    [Fact]
    public void A_plan_reads_as_one_copy_per_expert_on_its_owner()
    {
        var model = PlanningKit.SmallModel(layers: 4, experts: 8);
        var plan = LayoutPlanner.Plan(0, PlanningKit.Shuffled(PlanningKit.Workers(3), seed: 5), 1, model);
        var p = ExpertPlacement.Of(plan);
        Assert.Equal(plan.ExpertOwner.Length, p.Layers);
        for (int l = 0; l < p.Layers; l++)
            for (int e = 0; e < 8; e++)
                Assert.Equal([PlanningKit.OwnerId(plan, l, e)], p.CopiesOf(l, e));
        foreach (var slot in plan.Workers)
            Assert.Equal(plan.ExpertsOn(1, plan.RankOf(slot.Id)), p.ExpertsOf(1, slot.Id));
    }

    [Fact]
    public void A_membership_re_plan_keeps_the_surviving_extra_copies_where_slots_allow()
    {
        var D = new WorkerId("d", 1, 0);
        // Before: A, B, C; expert 0 hot with copies on A, B, C; expert 1 on B and C; expert 2 on C.
        var before = new ExpertPlacement([A, B, C], [[[A, B, C], [B, C], [C]]]);
        // C is lost; the re-plan puts one copy of each on A, B and the newcomer D.
        var replanned = new ExpertPlacement([A, B, D], [[[A], [B], [D]]]);
        var kept = replanned.KeepingCopiesOf(before, slots: 2);
        // Expert 0 keeps B's copy (A already holds it), expert 1 keeps nothing new (B has it, C is gone).
        Assert.Equal(new ExpertPlacement([A, B, D], [[[A, B], [B], [D]]]), kept);
        // A slot limit of 1: nothing can be added.
        Assert.Equal(replanned, replanned.KeepingCopiesOf(before, slots: 1));
        // Deterministic and never beyond the slots, every expert still held.
        Assert.Equal(kept, replanned.KeepingCopiesOf(before, slots: 2));
        foreach (var w in kept.Workers) Assert.True(kept.ExpertsOf(0, w).Length <= 2);
        Assert.All(Enumerable.Range(0, 3), e => Assert.NotEmpty(kept.CopiesOf(0, e)));
        Assert.Throws<ArgumentException>(() => replanned.KeepingCopiesOf(new ExpertPlacement([A], [[[A], [A]]]), 2));
    }
}
