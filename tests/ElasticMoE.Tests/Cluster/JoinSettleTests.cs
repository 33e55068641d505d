using ElasticMoE.Runtime.Coordination;
using Xunit;

namespace ElasticMoE.Tests.Cluster;

public sealed class JoinSettleTests
{
    [Fact]
    public void A_lone_join_is_planned_after_one_quiet_window()
    {
        var s = new JoinSettle(0.5);
        Assert.False(s.Due(10));
        s.Joined(10);
        Assert.True(s.Pending);
        Assert.False(s.Due(10.49));
        Assert.True(s.Due(10.5));
        s.Planned();
        Assert.False(s.Pending);
        Assert.False(s.Due(100));
    }

    [Fact]
    public void Eight_arrivals_within_a_second_are_planned_with_one_replan()
    {
        var s = new JoinSettle(0.5);
        var boundaries = Enumerable.Range(0, 40).Select(i => 20 + i * 0.1).ToList();   // step boundaries every 0.1 s
        var arrivals = Enumerable.Range(0, 8).Select(i => 20.05 + i * 0.13).ToList();  // 8 nodes over 0.91 s
        int replans = 0, planned = 0, arrived = 0;
        foreach (var t in boundaries)
        {
            while (arrived < arrivals.Count && arrivals[arrived] <= t) s.Joined(arrivals[arrived++]);
            if (!s.Due(t)) continue;
            replans++;
            planned = arrived;
            s.Planned();
        }
        Assert.Equal(1, replans);
        Assert.Equal(8, planned);
    }

    [Fact]
    public void A_steady_trickle_cannot_postpone_the_replan_past_the_cap()
    {
        var s = new JoinSettle(0.5);
        double t = 0;
        for (; t < 10; t += 0.25)
        {
            s.Joined(t);
            if (s.Due(t)) break;
        }
        Assert.Equal(JoinSettle.CapFactor * 0.5, t, 6);
    }

    [Fact]
    public void A_leavers_notice_bounds_the_gathering_and_is_forgotten_once_planned()
    {
        // Leaves are gathered by the same rule; a notice (a third of it, passed as latest) ends the wait early.
        var s = new JoinSettle(1);
        s.Joined(0, latest: 0.6);
        s.Joined(0.3);
        Assert.False(s.Due(0.5));
        Assert.True(s.Due(0.6));
        s.Planned();
        s.Joined(10);
        Assert.False(s.Due(10.7));   // the old bound does not carry over
        Assert.True(s.Due(11));
    }

    [Fact]
    public void A_zero_window_plans_at_the_next_boundary()
    {
        var s = new JoinSettle(0);
        s.Joined(3);
        Assert.True(s.Due(3));
    }
}
