using ElasticMoE.Configuration;
using ElasticMoE.Planning;

namespace ElasticMoE.Tests.Planning;

/// <summary>The load window and the trigger that decide when a placement is re-planned, and for which loads.</summary>
public class RebalanceTriggerPlacementTests
{
    [Fact]
    public void The_window_sums_the_last_n_steps_and_a_redone_step_replaces_its_counts()
    {
        var w = new ExpertLoadWindow(2);
        Assert.Null(w.Loads());
        w.Add(1, [[1, 2], [3, 4]]);
        w.Add(2, [[10, 20], [30, 40]]);
        w.Add(2, [[5, 5], [5, 5]]);   // step 2 redone after an abort
        Assert.Equal([[6, 7], [8, 9]], w.Loads()!);
        w.Add(3, [[100, 0], [0, 100]]);   // step 1 drops out
        Assert.Equal(2, w.Count);
        Assert.Equal([[105, 5], [5, 105]], w.Loads()!);
        Assert.Throws<ArgumentException>(() => w.Add(4, [[1, 2, 3], [4, 5, 6]]));
        Assert.Throws<ArgumentOutOfRangeException>(() => new ExpertLoadWindow(0));
    }

    [Fact]
    public void Off_by_default_and_otherwise_only_at_multiples_of_every_above_the_threshold()
    {
        var off = new RebalanceTrigger(RebalanceOptions.Default);
        Assert.False(off.Check(10, 3.0));
        var t = new RebalanceTrigger(RebalanceOptions.Default with { Every = 10 });
        Assert.False(t.Check(9, 1.5));
        Assert.False(t.Check(10, 1.10));
        Assert.True(t.Check(20, 1.11));
    }

    [Fact]
    public void A_rebalance_that_stays_above_the_threshold_is_not_repeated_until_it_gets_worse_or_balance_returns()
    {
        var t = new RebalanceTrigger(RebalanceOptions.Default with { Every = 10 });   // threshold 1.10, hysteresis 0.05
        Assert.True(t.Check(10, 1.30));
        t.Rebalanced(1.20);                 // the best this layout allows
        Assert.False(t.Check(20, 1.22));    // not again for 1.22
        Assert.True(t.Check(30, 1.26));     // worse than 1.20 + 0.05
        t.Rebalanced(1.20);
        Assert.False(t.Check(33, 1.05));    // balance returned (not a check step): the bar drops back
        Assert.True(t.Check(40, 1.15));
        t.Rebalanced(1.02);
        Assert.True(t.Check(50, 1.11));     // a rebalance that got below the threshold leaves the threshold as the bar
    }
}
