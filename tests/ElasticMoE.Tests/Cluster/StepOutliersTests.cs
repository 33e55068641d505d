using ElasticMoE.Planning;
using ElasticMoE.Runtime.Coordination;

namespace ElasticMoE.Tests.Cluster;

public class StepOutliersTests
{
    private static WorkerId W(int i) => new($"akka.tcp://elasticmoe@127.0.0.1:{9000 + i}", 1, 0);

    [Fact]
    public void A_worker_twice_as_slow_as_the_others_median_is_named_and_balanced_workers_are_not()
    {
        var slow = StepOutliers.Find([(W(0), 7, 0.10), (W(1), 7, 0.11), (W(2), 7, 0.35)]);
        var why = Assert.Single(slow);
        Assert.Equal(W(2), why.Key);
        Assert.Contains("step 8", why.Value);
        Assert.Empty(StepOutliers.Find([(W(0), 7, 0.10), (W(1), 7, 0.12), (W(2), 7, 0.15)]));
        // Two workers: each against the other.
        Assert.Equal([W(1)], StepOutliers.Find([(W(0), 3, 0.1), (W(1), 3, 0.4)]).Keys);
    }

    [Fact]
    public void Tiny_times_an_older_step_or_a_single_worker_never_make_an_outlier()
    {
        // 3x the others but only 20 ms more: noise at this scale.
        Assert.Empty(StepOutliers.Find([(W(0), 5, 0.010), (W(1), 5, 0.010), (W(2), 5, 0.030)]));
        // Only the latest step all reported counts: W(2)'s figure is of an older step.
        Assert.Empty(StepOutliers.Find([(W(0), 9, 0.1), (W(1), 9, 0.1), (W(2), 4, 5.0)]));
        Assert.Empty(StepOutliers.Find([(W(0), 9, 5.0)]));
        Assert.Empty(StepOutliers.Find([]));
    }
}
