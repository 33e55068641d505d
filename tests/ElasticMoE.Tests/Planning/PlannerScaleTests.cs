using ElasticMoE.Benchmarks;
using Xunit.Abstractions;

namespace ElasticMoE.Tests.Planning;

/// <summary>
/// The planners at a world size, timed for the output only (timing never decides a test): the figures for
/// docs/benchmarks.md come from <c>elasticmoe bench --suite planners</c>; here a size small enough for the suite,
/// checking that every step did its work.
/// </summary>
public sealed class PlannerScaleTests(ITestOutputHelper output)
{
    [Theory]
    [InlineData(64, 64, 8)]
    public void The_planners_do_real_work_at_a_world_size_and_report_their_time(int workers, int experts, int moeLayers)
    {
        var f = PlannerScaleBenchmarks.Run(new PlannerScaleBenchmarks.Setup(workers, experts, moeLayers));
        output.WriteLine(f.ToString());
        Assert.True(f.ShrinkMoves > 0, "losing a worker moves its units to someone");
        Assert.True(f.GrowMoves > 0, "a newcomer receives units");
        Assert.True(f.Copies >= experts * moeLayers, "every expert of every layer has a copy");
        Assert.True(f.MaxOverMeanAfter <= f.MaxOverMeanBefore, "a rebalance never makes a layer worse");
    }
}
