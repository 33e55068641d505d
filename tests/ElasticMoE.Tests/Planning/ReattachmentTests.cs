using ElasticMoE.Planning;
using ElasticMoE.State;
using static ElasticMoE.Tests.Planning.PlanningKit;

namespace ElasticMoE.Tests.Planning;

/// <summary>
/// The pure rule a restarted coordinator applies to the units the running nodes still hold: adopt them
/// only when they agree with its journal, else say why (the run then goes back to its checkpoint).
/// </summary>
public class ReattachmentTests
{
    private static readonly ElasticMoE.Configuration.ModelOptions Model = SmallModel();

    // Plan epoch 3 over 4 workers (DP 2 x PP 2), mirrored on buddies.
    private static TrainingPlan Prior()
        => ElasticPlanner.Next(null, Workers(4), 4, 2, Model, epoch: 3, redundancy: 1);

    // The new incarnation of a worker: same node and device, another system uid.
    private static WorkerSlot Reborn(WorkerSlot w) => w with { Id = w.Id with { SystemUid = w.Id.SystemUid + 1000 } };

    // What every worker of the plan holds after `steps` steps: its units (with mirrors), checksum by unit.
    private static List<HeldWorker> Held(TrainingPlan plan, long steps, Func<UnitId, ulong>? checksum = null)
        => Enumerable.Range(0, plan.WorldSize).Select(r => new HeldWorker(plan.Workers[r].Id, Reborn(plan.Workers[r]), plan.Epoch,
            plan.HoldingsOf(r, Model).Select(u => (u, steps - 1, checksum?.Invoke(u) ?? (ulong)u.GetHashCode())).ToList())).ToList();

    [Fact]
    public void Every_worker_back_with_every_unit_at_one_step_is_adopted_under_the_new_identities()
    {
        var prior = Prior();
        var d = Reattachment.Decide(prior, journalNextStep: 20, Held(prior, 21), Model);
        Assert.True(d.Adopt, d.Why);
        Assert.Equal(21, d.NextStep);   // one commit the journal never got is kept
        Assert.Empty(d.Gone);
        Assert.Equal(prior.Workers.Select(Reborn), d.Plan!.Workers);
        Assert.Equal((prior.Dp, prior.Pp, prior.Stages, prior.ExpertOwner, prior.Redundancy), (d.Plan.Dp, d.Plan.Pp, d.Plan.Stages, d.Plan.ExpertOwner, d.Plan.Redundancy));
        Assert.Equal(prior.Epoch, d.Plan.Epoch);
    }

    [Fact]
    public void A_worker_that_did_not_come_back_is_gone_when_the_others_and_its_mirror_hold_everything()
    {
        var prior = Prior();
        var held = Held(prior, 20);
        held.RemoveAt(1);
        var d = Reattachment.Decide(prior, 20, held, Model);
        Assert.True(d.Adopt, d.Why);
        Assert.Equal([prior.Workers[1].Id], d.Gone);
        Assert.Equal(prior.Workers[1], d.Plan!.Workers[1]);   // the gone one keeps its old identity: nothing can address it
    }

    [Fact]
    public void Units_at_two_steps_mean_an_update_was_in_flight_and_are_not_adopted()
    {
        var prior = Prior();
        var held = Held(prior, 20);
        held[0] = held[0] with { Units = held[0].Units.Select(u => (u.Unit, 20L, u.Checksum)).ToList() };
        var d = Reattachment.Decide(prior, 20, held, Model);
        Assert.False(d.Adopt);
        Assert.Contains("different steps (20, 21)", d.Why);
    }

    [Fact]
    public void Units_behind_the_journal_are_not_adopted()
    {
        var prior = Prior();
        var d = Reattachment.Decide(prior, 25, Held(prior, 20), Model);
        Assert.False(d.Adopt);
        Assert.Contains("behind the journal's 25", d.Why);
    }

    [Fact]
    public void Replicas_that_differ_are_not_adopted()
    {
        var prior = Prior();
        var held = Held(prior, 20);
        var dense = held[0].Units[0].Unit;
        held[2] = held[2] with { Units = held[2].Units.Select(u => u.Unit == dense ? (u.Unit, u.AppliedStep, u.Checksum ^ 1) : u).ToList() };
        Assert.Contains(held[2].Units, u => u.Unit == dense);   // rank 2 is stage 0's other replica
        var d = Reattachment.Decide(prior, 20, held, Model);
        Assert.False(d.Adopt);
        Assert.Contains($"copies of unit {dense} differ", d.Why);
    }

    [Fact]
    public void Units_of_another_plan_or_a_unit_nobody_holds_are_not_adopted()
    {
        var prior = Prior();
        var older = Held(prior, 20).Select(h => h with { Epoch = 2 }).ToList();
        Assert.Contains("no returning node holds the units of plan 3", Reattachment.Decide(prior, 20, older, Model).Why);

        // Without mirrors, a worker that did not come back takes its experts with it.
        var bare = ElasticPlanner.Next(null, Workers(4), 4, 2, Model, epoch: 3, redundancy: 0);
        var held = Held(bare, 20);
        held.RemoveAt(3);
        var d = Reattachment.Decide(bare, 20, held, Model);
        Assert.False(d.Adopt);
        Assert.Contains("held by no returning node", d.Why);
    }

    [Fact]
    public void A_worker_missing_one_of_its_units_counts_as_gone()
    {
        var prior = Prior();
        var held = Held(prior, 20);
        held[1] = held[1] with { Units = held[1].Units.Skip(1).ToList() };
        var d = Reattachment.Decide(prior, 20, held, Model);
        Assert.True(d.Adopt, d.Why);
        Assert.Equal([prior.Workers[1].Id], d.Gone);
    }
}
