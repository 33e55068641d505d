using Akka.Actor;
using Akka.Configuration;
using Akka.Persistence;
using ElasticMoE.Planning;
using ElasticMoE.Runtime.Coordination;
using ElasticMoE.Runtime.Journal;
using ElasticMoE.State;
using ElasticMoE.Training;
using Microsoft.Data.Sqlite;

namespace ElasticMoE.Tests.Journal;

/// <summary>A run directory for one test, removed after it (SQLite's pooled connections closed first).</summary>
internal sealed class TempRunDir : IDisposable
{
    public string Path { get; } = TestSupport.TempDir();

    public void Dispose()
    {
        SqliteConnection.ClearAllPools();
        try { Directory.Delete(Path, recursive: true); } catch (IOException) { }
    }
}

/// <summary>Sample coordinator histories, and journals run in actor systems of their own so a test can drop one and start another.</summary>
internal static class JournalTestKit
{
    public static readonly TimeSpan Patience = TimeSpan.FromSeconds(30);

    public static WorkerSlot Slot(int node, int device) =>
        new(new WorkerId($"akka.tcp://elasticmoe@10.0.0.{node}:4053", 7000 + node, device), $"10.0.0.{node}:{6000 + device}");

    public static TrainingPlan Plan(int epoch, IReadOnlyList<WorkerSlot> workers, int pp) =>
        new(epoch, workers.Count / pp, pp, LayoutPlanner.SplitLayers(4, pp), workers.ToArray(), LayoutPlanner.RoundRobin(3, 8, workers.Count));

    public static StepResult Step(long step) => new(
        step, Loss: 5.5 - 0.01 * step + 1e-13, Lr: 3e-4 * (step + 1) / 7, GradNorm: 0.25 + step / 3.0, MaxVio: 0.1 / (step + 1),
        ExpertCounts: [[10 + step, 20, 30, 40, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11, step]], Tokens: 2048, Seconds: 0.125 + step * 1e-3);

    /// <summary>
    /// A run of <paramref name="steps"/> steps that meets every kind of event: two nodes join, a plan, steps,
    /// a third node joins and a re-plan moves experts, a checkpoint, a node is lost, another re-plan, a node
    /// leaves, more steps, a second checkpoint.
    /// </summary>
    /// <remarks>
    /// Frozen: the stored fixture <c>Journal/fixtures/v1</c> was written from <c>History(24)</c> (and
    /// <see cref="Slot"/>, <see cref="Plan"/>, <see cref="Step"/>), and its test expects exactly this.
    /// </remarks>
    public static List<ICoordinatorEvent> History(int steps = 24)
    {
        var a = new[] { Slot(1, 0), Slot(1, 1) };
        var b = new[] { Slot(2, 0), Slot(2, 1) };
        var c = new[] { Slot(3, 0), Slot(3, 1) };
        var events = new List<ICoordinatorEvent>
        {
            new RunStarted("fp:model=3f2a;data=91bc;seed=1337", 1337, 0),
            new NodeJoined(a[0].NodeAddress, a[0].Id.SystemUid, a),
            new NodeJoined(b[0].NodeAddress, b[0].Id.SystemUid, b),
            new PlanChanged(Plan(1, [.. a, .. b], 2), 0),
        };
        long step = 0;
        void Steps(int n) { for (int i = 0; i < n; i++, step++) events.Add(new StepCommitted(Step(step), 1 + (int)(step % 3 == 2 ? 1 : 0))); }
        Steps(steps / 3);
        events.Add(new NodeJoined(c[0].NodeAddress, c[0].Id.SystemUid, c));
        var plan2 = Plan(2, [.. a, .. b, .. c], 2);
        events.Add(new PlanChanged(plan2, step));
        events.Add(new ExpertsMoved(2, [
            new UnitTransfer(UnitId.OfExpert(1, 4), a[0].Id, c[0].Id),
            new UnitTransfer(UnitId.OfExpert(2, 5), b[1].Id, c[1].Id),
            new UnitTransfer(UnitId.OfBlock(3), b[1].Id, c[1].Id),
        ]));
        Steps(steps / 3);
        events.Add(new CheckpointCommitted(step, new string('a', 64), [
            new CheckpointFile("w0.safetensors", 123_456, new string('1', 64)),
            new CheckpointFile("w1.safetensors", 654_321, new string('2', 64)),
        ]));
        events.Add(new NodeLost(b[0].NodeAddress, b[0].Id.SystemUid, "unreachable for 10 s", step));
        events.Add(new PlanChanged(Plan(3, [.. a, .. c], 2), step));
        events.Add(new NodeRemoved(c[0].NodeAddress, c[0].Id.SystemUid, "left gracefully"));
        events.Add(new PlanChanged(Plan(4, a, 1), step));
        Steps(steps - 2 * (steps / 3));
        events.Add(new CheckpointCommitted(step, new string('b', 64), [new CheckpointFile("w0.safetensors", 99, new string('3', 64))]));
        return events;
    }

    public static CoordinatorState Replay(IEnumerable<ICoordinatorEvent> events) =>
        events.Aggregate(CoordinatorState.Empty, (s, e) => s.Apply(e));

    /// <summary>
    /// Equal states: the same stored bytes (every field, floats bit for bit; record equality would compare
    /// the lists by reference), plus the fields by name so a failure says which.
    /// </summary>
    public static void AssertSameState(CoordinatorState expected, CoordinatorState actual)
    {
        Assert.Equal(expected.RunFingerprint, actual.RunFingerprint);
        Assert.Equal(expected.NextStep, actual.NextStep);
        Assert.Equal(expected.Workers, actual.Workers);
        Assert.Equal(expected.Epoch, actual.Epoch);
        Assert.Equal(expected.Committed.Count, actual.Committed.Count);
        Assert.Equal(expected.Checkpoints.Count, actual.Checkpoints.Count);
        Assert.Equal(expected.Ended, actual.Ended);
        Assert.Equal(CoordinatorJournalSerializer.Encode(expected).Bytes, CoordinatorJournalSerializer.Encode(actual).Bytes);
    }

    /// <summary>An actor system with <paramref name="journal"/> as its persistence config.</summary>
    public static ActorSystem NewSystem(Config journal, string name = "journal-test") =>
        ActorSystem.Create(name, ConfigurationFactory.ParseString("akka.loglevel = WARNING\nakka.stdout-loglevel = WARNING").WithFallback(journal));

    /// <summary>Starts a <see cref="CoordinatorJournal"/> under a host that is its listener; returns it once recovery has ended.</summary>
    public static async Task<(IActorRef Journal, object Outcome)> Start(ActorSystem system, string persistenceId, int snapshotEvery = 100)
    {
        var outcome = new TaskCompletionSource<object>(TaskCreationOptions.RunContinuationsAsynchronously);
        var journal = new TaskCompletionSource<IActorRef>(TaskCreationOptions.RunContinuationsAsynchronously);
        system.ActorOf(Props.Create(() => new Host(CoordinatorJournal.Props(persistenceId, null, snapshotEvery), journal, outcome)));
        var result = await outcome.Task.WaitAsync(Patience);
        return (await journal.Task, result);
    }

    public static async Task<JournalRecovered> Recovered(ActorSystem system, string persistenceId, int snapshotEvery = 100)
    {
        var (_, outcome) = await Start(system, persistenceId, snapshotEvery);
        return outcome as JournalRecovered ?? throw new Xunit.Sdk.XunitException($"expected recovery, got {outcome}");
    }

    /// <summary>Appends the events in batches of <paramref name="batch"/>, each answered before the next is sent.</summary>
    public static async Task<EventsAppended> AppendAll(IActorRef journal, IReadOnlyList<ICoordinatorEvent> events, int batch = 1)
    {
        EventsAppended? last = null;
        for (int i = 0; i < events.Count; i += batch)
        {
            var reply = await journal.Ask<object>(new AppendEvents(i, events.Skip(i).Take(batch).ToArray()), Patience);
            last = reply as EventsAppended ?? throw new Xunit.Sdk.XunitException($"append {i} answered {reply}");
        }
        return last!;
    }

    /// <summary>
    /// Appends <paramref name="history"/> in batches in a system of its own, waits until the last snapshot
    /// the journal takes is stored, drops that system without stopping anything, and recovers the journal
    /// in a new one.
    /// </summary>
    public static async Task<(EventsAppended Written, JournalRecovered Recovered)> WriteThenRecover(
        Func<Config> journalConfig, string persistenceId, IReadOnlyList<ICoordinatorEvent> history, int snapshotEvery, int batch)
    {
        var first = NewSystem(journalConfig());
        EventsAppended written;
        try
        {
            var (journal, outcome) = await Start(first, persistenceId, snapshotEvery);
            Assert.Equal(0, Assert.IsType<JournalRecovered>(outcome).SequenceNr);
            written = await AppendAll(journal, history, batch);
            long lastSnapshot = 0, since = 0;
            for (int i = 0; i < history.Count; i += batch)
            {
                since += Math.Min(batch, history.Count - i);
                if (since >= snapshotEvery) (lastSnapshot, since) = (i + Math.Min(batch, history.Count - i), 0);
            }
            if (lastSnapshot > 0) await WaitForSnapshot(first, persistenceId, lastSnapshot);
        }
        finally { await first.Terminate(); }

        var second = NewSystem(journalConfig());
        try { return (written, await Recovered(second, persistenceId, snapshotEvery)); }
        finally { await second.Terminate(); }
    }

    /// <summary>Recovery found every written event, started from a snapshot, replayed only what followed it, and rebuilt the same state.</summary>
    public static void AssertRecoveredFromSnapshot(IReadOnlyList<ICoordinatorEvent> history, EventsAppended written, JournalRecovered recovered)
    {
        Assert.Equal(history.Count, written.SequenceNr);
        Assert.Equal(written.SequenceNr, recovered.SequenceNr);
        Assert.True(recovered.SnapshotSequenceNr > 0, "recovered from a snapshot");
        Assert.Equal(recovered.SequenceNr - recovered.SnapshotSequenceNr, recovered.EventsReplayed);
        Assert.True(recovered.EventsReplayed < history.Count);
        AssertSameState(Replay(history), recovered.State);
    }

    /// <summary>Polls the configured snapshot store (whichever plugin) until it holds the snapshot at <paramref name="sequenceNr"/>.</summary>
    private static async Task WaitForSnapshot(ActorSystem system, string persistenceId, long sequenceNr)
    {
        var store = Persistence.Instance.Apply(system).SnapshotStoreFor(null);
        var deadline = DateTime.UtcNow + Patience;
        while (DateTime.UtcNow < deadline)
        {
            var result = await store.Ask<LoadSnapshotResult>(new LoadSnapshot(persistenceId, SnapshotSelectionCriteria.Latest, long.MaxValue), Patience);
            if (result.Snapshot?.Metadata.SequenceNr >= sequenceNr) return;
            await Task.Delay(50);
        }
        throw new TimeoutException($"no snapshot at sequence {sequenceNr} was stored");
    }

    /// <summary>The parent of the journal under test: its listener, reporting the recovery outcome.</summary>
    private sealed class Host : ReceiveActor
    {
        public Host(Props journalProps, TaskCompletionSource<IActorRef> journal, TaskCompletionSource<object> outcome)
        {
            var child = Context.ActorOf(journalProps, "journal");
            Context.Watch(child);
            journal.SetResult(child);
            // Block bodies: a lambda returning bool would pick Receive's predicate overload.
            Receive<JournalRecovered>(r => { outcome.TrySetResult(r); });
            Receive<JournalFailed>(f => { outcome.TrySetResult(f); });
            Receive<Terminated>(t => { outcome.TrySetResult(t); });
        }
    }
}
