using ElasticMoE.Planning;
using ElasticMoE.State;

namespace ElasticMoE.Tests.Planning;

/// <summary>Replicated experts in a <see cref="TrainingPlan"/>: copies, what each rank holds, mirrors, and the placement round trip.</summary>
public class ReplicatedPlanTests
{
    private static readonly ElasticMoE.Configuration.ModelOptions Model = PlanningKit.SmallModel(layers: 3, experts: 4);

    // 3 workers on 3 nodes, PP 1: 2 MoE layers of 4 experts, round robin.
    private static TrainingPlan Base(int redundancy = 0)
        => LayoutPlanner.Plan(1, PlanningKit.Workers(3), 1, Model) with { Redundancy = redundancy };

    // Layer 0 expert 0 also on rank 2 (two copies), everything else as round robin put it.
    private static TrainingPlan Replicated(int redundancy = 0)
    {
        var plan = Base(redundancy);
        var p = ExpertPlacement.Of(plan);
        var holders = Enumerable.Range(0, p.Layers).Select(l => Enumerable.Range(0, p.ExpertCount(l))
            .Select(e => l == 0 && e == 0 ? p.CopiesOf(l, e).Append(plan.Workers[2].Id) : p.CopiesOf(l, e))).ToArray();
        return plan.WithPlacement(new ExpertPlacement(p.Workers, holders));
    }

    [Fact]
    public void A_plan_without_copies_is_unchanged_by_its_own_placement()
    {
        var plan = Base();
        var again = plan.WithPlacement(ExpertPlacement.Of(plan));
        Assert.Null(again.Copies);
        Assert.True(plan.SameLayout(again));
        Assert.Equal([plan.ExpertOwner[1][2]], plan.CopiesOf(1, 2));
        Assert.False(plan.IsReplicated(0));
    }

    [Fact]
    public void Copies_are_held_by_every_copy_holder_and_the_owner_is_the_first_copy()
    {
        var plan = Replicated();
        Assert.Equal([0, 2], plan.CopiesOf(0, 0));
        Assert.Equal(0, plan.ExpertOwner[0][0]);
        Assert.True(plan.IsReplicated(0));
        Assert.False(plan.IsReplicated(1));
        Assert.Contains(0, plan.ExpertsOn(0, 2));
        Assert.Contains(0, plan.ExpertsOn(0, 0));
        var unit = UnitId.OfExpert(Model.DenseLayers, 0);
        Assert.Equal([0, 2], plan.Holders(Model)[unit]);
        Assert.Contains(unit, plan.UnitsOf(2, Model));
        Assert.False(plan.SameLayout(Base()));
        Assert.True(plan.SameLayout(Replicated()));
        // The placement reads the copies back, and converts to the same plan.
        var p = ExpertPlacement.Of(plan);
        Assert.Equal([plan.Workers[0].Id, plan.Workers[2].Id], p.CopiesOf(0, 0));
        Assert.True(plan.SameLayout(Base().WithPlacement(p)));
    }

    [Fact]
    public void An_expert_with_a_copy_on_another_node_needs_no_mirror()
    {
        var plan = Replicated(redundancy: 1);
        var unit = UnitId.OfExpert(Model.DenseLayers, 0);
        for (int r = 0; r < plan.WorldSize; r++)
        {
            Assert.DoesNotContain(unit, plan.MirroredUnitsOf(r, Model));
            Assert.DoesNotContain(unit, plan.MirrorsHeldBy(r, Model).Select(m => m.Unit));
        }
        // Unreplicated experts are still mirrored by their owner's buddy.
        var other = UnitId.OfExpert(Model.DenseLayers, 1);
        Assert.Contains(other, plan.MirroredUnitsOf(plan.ExpertOwner[0][1], Model));
    }

    [Fact]
    public void A_replicated_layer_is_never_private_to_a_stage()
    {
        // DP 1, PP 3: without copies each stage runs its own experts privately.
        var plan = LayoutPlanner.Plan(1, PlanningKit.Workers(3), 3, Model);
        Assert.True(plan.ExpertsPrivateTo(0, plan.StageOfBlock(Model.DenseLayers), Model.DenseLayers));
        var p = ExpertPlacement.Of(plan);
        var holders = Enumerable.Range(0, p.Layers).Select(l => Enumerable.Range(0, p.ExpertCount(l))
            .Select(e => l == 0 && e == 1 ? p.Workers : p.CopiesOf(l, e))).ToArray();
        var replicated = plan.WithPlacement(new ExpertPlacement(p.Workers, holders));
        Assert.False(replicated.ExpertsPrivateTo(0, replicated.StageOfBlock(Model.DenseLayers), Model.DenseLayers));
        Assert.True(replicated.ExpertsPrivateTo(1, replicated.StageOfBlock(Model.DenseLayers + 1), Model.DenseLayers + 1));
    }

    [Fact]
    public void A_placement_on_a_worker_outside_the_plan_is_refused()
    {
        var plan = Base();
        var stranger = PlanningKit.Slot("elsewhere").Id;
        var p = ExpertPlacement.Of(plan);
        var holders = Enumerable.Range(0, p.Layers).Select(l => Enumerable.Range(0, p.ExpertCount(l))
            .Select(e => l == 0 && e == 0 ? [stranger] : p.CopiesOf(l, e))).ToArray();
        var ex = Assert.Throws<ArgumentException>(() => plan.WithPlacement(new ExpertPlacement(p.Workers.Append(stranger), holders)));
        Assert.Contains("elsewhere", ex.Message);
    }

    [Theory]
    [InlineData(10, 1), InlineData(10, 3), InlineData(7, 3), InlineData(2, 4), InlineData(12, 5)]
    public void Copies_take_contiguous_shares_of_the_micro_batches_in_order(int microBatches, int copies)
    {
        int next = 0;
        for (int i = 0; i < copies; i++)
        {
            var (lo, hi) = TrainingPlan.CopyMicroBatches(i, copies, microBatches);
            Assert.Equal(next, lo);
            Assert.True(hi >= lo);
            for (int m = lo; m < hi; m++) Assert.Equal(i, TrainingPlan.CopyFor(m, copies, microBatches));
            next = hi;
        }
        Assert.Equal(microBatches, next);
        Assert.Throws<ArgumentOutOfRangeException>(() => TrainingPlan.CopyFor(microBatches, copies, microBatches));
    }
}
