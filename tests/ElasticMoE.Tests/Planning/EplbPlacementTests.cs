using ElasticMoE.Planning;

namespace ElasticMoE.Tests.Planning;

public class EplbPlacementTests
{
    [Fact]
    public void Uniform_loads_are_packed_evenly_and_every_slot_is_filled()
    {
        var p = EplbPlanner.Plan([Enumerable.Repeat(1.0, 16).ToArray()], PlanningKit.Ids(4), slots: 5);
        Assert.Equal(1.0, p.MaxOverMean([Enumerable.Repeat(1.0, 16).ToArray()]), 12);
        var perWorker = p.Replicas[0].SelectMany(r => r).GroupBy(w => w).Select(g => g.Count()).ToList();
        Assert.Equal(Enumerable.Repeat(5, 4), perWorker);
        Assert.All(p.Replicas[0], r => Assert.NotEmpty(r));
    }

    [Fact]
    public void Each_extra_replica_goes_to_the_expert_with_the_most_load_per_replica()
    {
        // 12 physical experts for 8: load per replica 4 -> e0 (2 each); then e0 and e1 tie at 2: the first, e0 (1.33);
        // then e1 (1 each); then e0 (1 each). Counts [4, 2, 1, ...], as eplb.py's replicate_experts gives.
        double[] load = [4, 2, 1, 1, 1, 1, 1, 1];
        var p = EplbPlanner.Plan([load], PlanningKit.Ids(4), slots: 3);
        Assert.Equal([4, 2, 1, 1, 1, 1, 1, 1], p.Replicas[0].Select(r => r.Length));
        Assert.Equal(1.0, p.MaxOverMean([load]), 12);
        // Every replica weighs 1, so packing goes round the workers in replica order (experts 0-7, then e0, e0, e1, e0):
        // e0's second replica lands on worker 0 again, which its first is on.
        Assert.Equal([0, 0, 1, 3], p.Replicas[0][0]);
        Assert.Equal(1, p.MergedReplicas);
        Assert.Equal(3, p.Copies.CopiesOf(0, 0).Count);
    }

    [Fact]
    public void Replicas_are_packed_heaviest_first_onto_the_lightest_worker_with_room()
    {
        // 4 experts, 2 workers x 2 slots, no spare: sorted e1 (5), e0 (3), e3 (2), e2 (1): e1 to w0 (a tie: the
        // first), e0 to w1, e3 to w1 (lighter), e2 to w0 (w1 is full).
        var p = EplbPlanner.Plan([[3, 5, 1, 2]], PlanningKit.Ids(2), slots: 2);
        Assert.Equal([1, 0, 0, 1], p.Replicas[0].Select(r => r.Single()));
    }

    [Fact]
    public void It_recomputes_from_scratch_so_a_small_drift_moves_many_copies()
    {
        var rng = new Random(3);
        var workers = PlanningKit.Ids(8);
        var loads = new[] { Benchmarks.PlacementBenchmarks.ZipfLoads(64, 1, rng) };
        var drifted = new[] { loads[0].Select(x => x * (1 + 0.04 * (rng.NextDouble() - 0.5))).ToArray() };
        var before = EplbPlanner.Plan(loads, workers, 10).Copies;
        var after = EplbPlanner.Plan(drifted, workers, 10).Copies;
        Assert.True(after.CopiesMovedFrom(before) > after.TotalCopies / 4, $"±2 % drift moved {after.CopiesMovedFrom(before)} of {after.TotalCopies}");
    }

    [Fact]
    public void Two_replicas_on_one_worker_are_one_copy_in_a_placement()
    {
        // One expert carries everything: 4 physical slots on 2 workers, 3 of them its replicas.
        var p = EplbPlanner.Plan([[9, 0]], PlanningKit.Ids(2), slots: 2);
        Assert.Equal(3, p.Replicas[0][0].Length);
        Assert.Equal(1, p.MergedReplicas);
        Assert.Equal(2, p.Copies.CopiesOf(0, 0).Count);
    }
}
