using ElasticMoE.Planning;
using static ElasticMoE.Tests.Planning.PlanningKit;

namespace ElasticMoE.Tests.Planning;

/// <summary>
/// The optimised <see cref="RebalancePlanner"/> against the algorithm as it was (<see cref="RebalancePlannerReference"/>),
/// on seeded random requests at small sizes: initial placements, budgeted rebalances after drift, and repairs after
/// workers left or joined. Same copies in the same order, same max/mean to the bit, same copies moved.
/// </summary>
public sealed class RebalancePlannerEquivalenceTests
{
    private static void AssertSame(RebalanceResult expected, RebalanceResult actual, string what)
    {
        Assert.True(BitConverter.DoubleToInt64Bits(expected.MaxOverMeanBefore) == BitConverter.DoubleToInt64Bits(actual.MaxOverMeanBefore),
            $"{what}: before {expected.MaxOverMeanBefore:R} vs {actual.MaxOverMeanBefore:R}");
        Assert.True(BitConverter.DoubleToInt64Bits(expected.MaxOverMeanAfter) == BitConverter.DoubleToInt64Bits(actual.MaxOverMeanAfter),
            $"{what}: after {expected.MaxOverMeanAfter:R} vs {actual.MaxOverMeanAfter:R}");
        Assert.Equal(expected.CopiesMoved, actual.CopiesMoved);
        Assert.Equal(expected.Placement.Layers, actual.Placement.Layers);
        for (int l = 0; l < expected.Placement.Layers; l++)
            for (int e = 0; e < expected.Placement.ExpertCount(l); e++)
                Assert.True(expected.Placement.CopiesOf(l, e).SequenceEqual(actual.Placement.CopiesOf(l, e)),
                    $"{what}: layer {l} expert {e}: [{string.Join(", ", expected.Placement.CopiesOf(l, e))}] vs [{string.Join(", ", actual.Placement.CopiesOf(l, e))}]");
    }

    private static double[][] Loads(Random rng, int layers, int experts) => Enumerable.Range(0, layers).Select(_ =>
        Enumerable.Range(0, experts).Select(k => rng.Next(10) == 0 ? 0.0 : rng.NextDouble() < 0.5 ? 1.0 / (1 + rng.Next(experts)) : rng.NextDouble()).ToArray()).ToArray();

    private static double[][] Drift(Random rng, double[][] loads, double by)
        => loads.Select(l => l.Select(x => x * (1 + by * (2 * rng.NextDouble() - 1))).ToArray()).ToArray();

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(3)]
    [InlineData(4)]
    [InlineData(5)]
    [InlineData(6)]
    public void Initial_placements_and_rebalances_are_those_of_the_reference(int seed)
    {
        var rng = new Random(seed);
        for (int round = 0; round < 6; round++)
        {
            int workers = rng.Next(2, 13), experts = rng.Next(2, 25), layers = rng.Next(1, 4);
            int slots = (experts + workers - 1) / workers + rng.Next(0, 3);
            var ids = Ids(workers);
            var loads = Loads(rng, layers, experts);
            string what = $"seed {seed} round {round}: {workers} workers x {experts} experts x {layers} layers, {slots} slots";
            var expected = RebalancePlannerReference.Plan(loads, ids, slots, null, 0);
            var actual = RebalancePlanner.Plan(loads, ids, slots, null, 0);
            AssertSame(expected, actual, what + ", initial");
            var today = expected.Placement;
            for (int t = 0; t < 4; t++)
            {
                loads = Drift(rng, loads, 0.3);
                int budget = rng.Next(0, 2 * workers);
                var e = RebalancePlannerReference.Plan(loads, ids, slots, today, budget);
                AssertSame(e, RebalancePlanner.Plan(loads, ids, slots, today, budget), $"{what}, rebalance {t} budget {budget}");
                today = e.Placement;
            }
        }
    }

    [Theory]
    [InlineData(11)]
    [InlineData(12)]
    [InlineData(13)]
    [InlineData(14)]
    public void Repairs_after_workers_leave_or_join_are_those_of_the_reference(int seed)
    {
        var rng = new Random(seed);
        for (int round = 0; round < 5; round++)
        {
            int workers = rng.Next(3, 12), experts = rng.Next(3, 24), layers = rng.Next(1, 4);
            var ids = Ids(workers + 2);
            var before = ids.Take(workers).ToArray();
            int slots = (experts + workers - 1) / workers + rng.Next(1, 3);
            var loads = Loads(rng, layers, experts);
            var today = RebalancePlannerReference.Plan(loads, before, slots, null, 0).Placement;
            // One or two gone, and sometimes a newcomer; fewer slots sometimes (a worker above its slots gives copies away).
            var after = before.Where((_, i) => i != rng.Next(workers)).Where((_, i) => rng.Next(6) != 0).Concat(rng.Next(2) == 0 ? [ids[workers]] : []).ToArray();
            int slotsAfter = Math.Max((experts + after.Length - 1) / after.Length, slots - rng.Next(0, 2));
            loads = Drift(rng, loads, 0.2);
            int budget = rng.Next(0, 3 * workers);
            string what = $"seed {seed} round {round}: {workers} -> {after.Length} workers x {experts} experts x {layers} layers, slots {slots} -> {slotsAfter}, budget {budget}";
            AssertSame(RebalancePlannerReference.Plan(loads, after, slotsAfter, today, budget),
                RebalancePlanner.Plan(loads, after, slotsAfter, today, budget), what);
        }
    }

    [Theory]
    [InlineData(21, 48, 16)]
    [InlineData(22, 64, 24)]
    [InlineData(23, 40, 40)]
    public void Many_workers_with_one_or_two_slots_give_the_reference_results(int seed, int workers, int experts)
    {
        // The shape of 1,024 workers x 256 experts: more workers than experts, every slot full, hot experts copied on
        // dozens of workers, so most candidate steps tie on max load and moves and the sum of squares decides.
        var rng = new Random(seed);
        var ids = Ids(workers);
        int slots = (experts + workers - 1) / workers + seed % 2;
        var loads = Enumerable.Range(0, 2).Select(_ => PlacementLoads(rng, experts)).ToArray();
        var expected = RebalancePlannerReference.Plan(loads, ids, slots, null, 0);
        AssertSame(expected, RebalancePlanner.Plan(loads, ids, slots, null, 0), $"{workers} x {experts}, initial");
        var today = expected.Placement;
        for (int t = 0; t < 3; t++)
        {
            loads = Drift(rng, loads, 0.1);
            int budget = Math.Max(1, today.TotalCopies / 10);
            var e = RebalancePlannerReference.Plan(loads, ids, slots, today, budget);
            AssertSame(e, RebalancePlanner.Plan(loads, ids, slots, today, budget), $"{workers} x {experts}, rebalance {t}");
            today = e.Placement;
        }
    }

    private static double[] PlacementLoads(Random rng, int experts) => ElasticMoE.Benchmarks.PlacementBenchmarks.ZipfLoads(experts, 1.0, rng);
}
