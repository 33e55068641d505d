using System.Runtime.Serialization;
using Akka.Configuration;
using ElasticMoE.Planning;
using ElasticMoE.Runtime.Coordination;
using ElasticMoE.Runtime.Journal;
using ElasticMoE.Runtime.Serialization;
using MessagePack;
using MessagePackSerializer = MessagePack.MessagePackSerializer;
using static ElasticMoE.Tests.Journal.JournalTestKit;

namespace ElasticMoE.Tests.Journal;

/// <summary>The stored forms of coordinator events: round trips, the Akka binding, and strict errors on damaged bytes.</summary>
public sealed class JournalCodecTests : Akka.TestKit.Xunit2.TestKit
{
    public JournalCodecTests() : base(ElasticMoESerialization.Config.WithFallback(ConfigurationFactory.ParseString("akka.loglevel = WARNING"))) { }

    [Fact]
    public void Every_event_kind_and_the_state_round_trip_through_the_akka_binding()
    {
        // The frozen history, then the events added since its fixture was written: a checkpoint retired,
        // a restarted coordinator resuming from the newest one, one re-attaching nodes, a rollback in place, and the run's end.
        var history = History();
        var first = history.OfType<CheckpointCommitted>().First();
        history.Add(new CheckpointRetired(first.Step, first.ManifestSha256));
        history.Add(new RunResumed(history.OfType<CheckpointCommitted>().Last().Step));
        // A coordinator started again that re-attached the nodes still holding the last plan's units.
        var lastPlan = history.OfType<PlanChanged>().Last().Plan;
        long next = history.OfType<StepCommitted>().Max(c => c.Result.Step) + 1;
        history.Add(new CoordinatorRestarted(next));
        history.Add(new WorkersAdopted(next + 1, lastPlan with { Workers = lastPlan.Workers.Select(w => w with { Id = w.Id with { SystemUid = w.Id.SystemUid + 100 } }).ToList() }));
        // Every copy of two experts lost: back to the newest checkpoint in place, the nodes kept.
        long checkpoint = history.OfType<CheckpointCommitted>().Last().Step;
        var before = Replay(history);
        history.Add(new RolledBack(next + 1, checkpoint, ["expert.1.2", "expert.2.0"]));
        var rolledBack = Replay(history);
        Assert.Equal(checkpoint, rolledBack.NextStep);
        Assert.Null(rolledBack.Plan);
        Assert.Equal(before.Workers, rolledBack.Workers);
        Assert.Equal(before.Committed.Where(c => c.Step < checkpoint), rolledBack.Committed);
        Assert.Equal(before.Checkpoints, rolledBack.Checkpoints);
        // Only to a committed checkpoint, never past the next step.
        long notCheckpointed = Enumerable.Range(1, (int)before.NextStep).First(n => before.Checkpoints.All(c => c.Step != n));
        Assert.Throws<InvalidOperationException>(() => before.Apply(new RolledBack(next + 1, notCheckpointed, ["expert.1.2"])));
        Assert.Throws<InvalidOperationException>(() => before.Apply(new RolledBack(next + 1, before.NextStep + 1, ["expert.1.2"])));
        history.Add(new ExpertsRebalanced(next + 1, 1.75, 1.37, 1, Requested: false));
        history.Add(new ShellCommandIssued(next + 1, "relayout", ["2", "1"]));
        history.Add(new ShellCommandIssued(next + 1, "node-leave", ["akka.tcp://elasticmoe@127.0.0.1:4054"]));
        history.Add(new RunEnded(next + 1, "the run was stopped: SIGTERM"));
        Assert.Equal("the run was stopped: SIGTERM", Replay(history).Ended);
        // The accepted shell commands are part of the state (and of its snapshot), in order.
        Assert.Equal(["relayout 2 1", "node-leave akka.tcp://elasticmoe@127.0.0.1:4054"],
            Replay(history).ShellCommands.Select(c => string.Join(' ', [c.Command, .. c.Args])).ToArray());
        var snapshot = (CoordinatorState)CoordinatorJournalSerializer.Decode(CoordinatorJournalSerializer.Encode(Replay(history)).Bytes, "j.CoordinatorState");
        Assert.Equal(Replay(history).ShellCommands.Select(c => (c.Step, c.Command, string.Join(' ', c.Args))),
            snapshot.ShellCommands.Select(c => (c.Step, c.Command, string.Join(' ', c.Args))));
        Assert.Equal(CoordinatorJournalCodec.WireTypes.Count - 1, history.Select(e => e.GetType()).Distinct().Count());
        foreach (var value in history.Cast<object>().Append(Replay(history)))
        {
            var serializer = Sys.Serialization.FindSerializerFor(value);
            Assert.IsType<CoordinatorJournalSerializer>(serializer);
            Assert.Equal(118, serializer.Identifier);
            var manifest = Akka.Serialization.Serialization.ManifestFor(serializer, value);
            var back = Sys.Serialization.Deserialize(serializer.ToBinary(value), serializer.Identifier, manifest);
            Assert.IsType(value.GetType(), back);
            // Same stored bytes again: every field survived, floats bit for bit.
            Assert.Equal(CoordinatorJournalSerializer.Encode(value).Bytes, CoordinatorJournalSerializer.Encode(back).Bytes);
        }
        AssertSameState(Replay(history), (CoordinatorState)CoordinatorJournalSerializer.Decode(
            CoordinatorJournalSerializer.Encode(Replay(history)).Bytes, "j.CoordinatorState"));
    }

    [Fact]
    public void A_plan_keeps_its_stages_workers_owners_and_redundancy()
    {
        var plan = Plan(5, [Slot(1, 0), Slot(1, 1), Slot(2, 0), Slot(2, 1)], 2);
        var back = ((PlanChanged)CoordinatorJournalSerializer.Decode(CoordinatorJournalSerializer.Encode(new PlanChanged(plan, 17)).Bytes, "j.PlanChanged")).Plan;
        Assert.True(plan.SameLayout(back));
        Assert.Equal(plan.Epoch, back.Epoch);
        // A stored redundancy this build's TrainingPlan cannot hold is refused, not dropped.
        var wire = (PlanChangedWire)CoordinatorJournalCodec.ToWire(new PlanChanged(plan, 17)).Wire;
        Assert.Equal(0, wire.Plan.Redundancy);
        var redundant = MessagePackSerializer.Serialize(wire with { Plan = wire.Plan with { Redundancy = 2 } });
        var redundancy = typeof(TrainingPlan).GetProperty("Redundancy");
        if (redundancy is null)
            Assert.Contains("redundancy 2", Assert.Throws<SerializationException>(() => CoordinatorJournalSerializer.Decode(redundant, "j.PlanChanged")).Message);
        else
            Assert.Equal(2, redundancy.GetValue(((PlanChanged)CoordinatorJournalSerializer.Decode(redundant, "j.PlanChanged")).Plan));
    }

    [Fact]
    public void A_plan_keeps_its_replicated_experts()
    {
        var plan = Plan(5, [Slot(1, 0), Slot(1, 1), Slot(2, 0), Slot(2, 1)], 1);
        var copies = plan.ExpertOwner.Select(layer => layer.Select(o => new[] { o }).ToArray()).ToArray();
        copies[0][0] = [copies[0][0][0], (copies[0][0][0] + 1) % plan.WorldSize];
        plan = plan with { Copies = copies };
        var back = ((PlanChanged)CoordinatorJournalSerializer.Decode(CoordinatorJournalSerializer.Encode(new PlanChanged(plan, 17)).Bytes, "j.PlanChanged")).Plan;
        Assert.True(plan.SameLayout(back));
        Assert.Equal(copies[0][0], back.CopiesOf(0, 0));
        // A plan stored before replicas (no key 8) reads as one copy per expert.
        var wire = (PlanChangedWire)CoordinatorJournalCodec.ToWire(new PlanChanged(plan with { Copies = null }, 17)).Wire;
        Assert.Null(wire.Plan.Copies);
        var old = ((PlanChanged)CoordinatorJournalSerializer.Decode(MessagePackSerializer.Serialize(wire), "j.PlanChanged")).Plan;
        Assert.Null(old.Copies);
    }

    [Fact]
    public void A_plan_keeps_its_mirror_keepers_and_failure_domains()
    {
        var slots = new[] { Slot(1, 0), Slot(2, 0), Slot(3, 0), Slot(4, 0) };
        var domains = slots.Select((s, i) => (s.NodeAddress, Domain: i < 2 ? "rack-a" : "rack-b")).ToDictionary(t => t.NodeAddress, t => t.Domain);
        var plan = ElasticPlanner.Next(null, slots, 4, 1, ElasticMoE.Tests.Planning.PlanningKit.SmallModel(), 5, redundancy: 2, domains: domains);
        Assert.NotNull(plan.Keepers);
        Assert.NotNull(plan.Domains);
        var back = ((PlanChanged)CoordinatorJournalSerializer.Decode(CoordinatorJournalSerializer.Encode(new PlanChanged(plan, 17)).Bytes, "j.PlanChanged")).Plan;
        Assert.True(plan.SameLayout(back));
        Assert.Equal(plan.Keepers, back.Keepers);
        Assert.Equal(plan.Domains, back.Domains);
        // A plan stored before r mirrors (no keys 9, 10) reads as keepers derived from the plan, every node its own domain.
        var wire = (PlanChangedWire)CoordinatorJournalCodec.ToWire(new PlanChanged(plan, 17)).Wire;
        var old = ((PlanChanged)CoordinatorJournalSerializer.Decode(
            MessagePackSerializer.Serialize(wire with { Plan = wire.Plan with { Keepers = null, Domains = null } }), "j.PlanChanged")).Plan;
        Assert.Null(old.Keepers);
        Assert.Null(old.Domains);
        Assert.All(Enumerable.Range(0, 4), r => Assert.Equal(2, old.MirrorKeepersOf(r).Length));
        // Keepers for another number of workers are refused, not misread.
        var bad = MessagePackSerializer.Serialize(wire with { Plan = wire.Plan with { Keepers = [[1]] } });
        Assert.Contains("mirror keepers", Assert.ThrowsAny<Exception>(() => CoordinatorJournalSerializer.Decode(bad, "j.PlanChanged")).ToString());
    }

    [Fact]
    public void Damaged_bytes_fail_with_the_record_and_its_size_named()
    {
        var (manifest, bytes) = CoordinatorJournalSerializer.Encode(new StepCommitted(Step(3), 1));
        Assert.Equal("j.StepCommitted", manifest);

        SerializationException Fails(byte[] b, string m = "j.StepCommitted") =>
            Assert.Throws<SerializationException>(() => CoordinatorJournalSerializer.Decode(b, m));

        var truncated = Fails(bytes[..^5]);
        Assert.Contains($"Corrupt coordinator journal record 'j.StepCommitted' ({bytes.Length - 5} bytes)", truncated.Message);
        Assert.Contains("trailing", Fails([.. bytes, 0xC0]).Message.Replace("follow the record", "trailing"));
        Assert.Contains("Corrupt coordinator journal record", Fails([0xC1, 0x00, 0x01]).Message);   // 0xC1: never used by msgpack
        Assert.Contains("Corrupt coordinator journal record", Fails([]).Message);
        Assert.Contains("Corrupt coordinator journal record", Fails("not msgpack at all"u8.ToArray()).Message);
        Assert.Contains("Corrupt coordinator journal record", Fails(bytes, "j.RunStarted").Message);     // another record's bytes
        Assert.Contains("no step result", Fails(MessagePackSerializer.Serialize(new object?[] { null, 1 })).Message);
        var unknown = Fails(bytes, "j.FromTheFuture");
        Assert.Contains("Unknown coordinator journal record 'j.FromTheFuture'", unknown.Message);
        Assert.Contains("j.StepCommitted", unknown.Message);
        // Through Akka as well (what the persistence plugin calls).
        Assert.Throws<SerializationException>(() => Sys.Serialization.Deserialize(bytes[..^5], 118, "j.StepCommitted"));
    }

    [Fact]
    public void Each_bit_flip_of_a_stored_event_fails_cleanly_or_decodes_to_a_valid_event()
    {
        // Msgpack has no checksum: a flipped bit in a number is a different number (the journal's store
        // guards its own pages). What must never happen is anything but a SerializationException.
        var bytes = CoordinatorJournalSerializer.Encode(History()[3]).Bytes;
        int failed = 0;
        for (int i = 0; i < bytes.Length * 8; i++)
        {
            var b = bytes.ToArray();
            b[i / 8] ^= (byte)(1 << (i % 8));
            try { Assert.IsType<PlanChanged>(CoordinatorJournalSerializer.Decode(b, "j.PlanChanged")); }
            catch (SerializationException) { failed++; }
        }
        Assert.True(failed > 0);
    }

    [Fact]
    public void An_event_that_is_not_a_coordinator_event_is_refused_by_name()
    {
        var ex = Assert.Throws<ArgumentException>(() => CoordinatorJournalSerializer.Encode("a string"));
        Assert.Contains("System.String has no stored form", ex.Message);
    }
}
