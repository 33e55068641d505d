using Akka.Actor;
using Akka.Event;
using Akka.Persistence;
using ElasticMoE.Runtime.Coordination;
using ElasticMoE.Runtime.Protocol;

namespace ElasticMoE.Runtime.Journal;

// The journal actor's protocol. Local only: the journal runs beside the coordinator that owns it.

/// <summary>
/// Append these events, in order, as one atomic write. They are checked against the state first
/// (<see cref="CoordinatorState.Apply"/>): events the state refuses are not written
/// (<see cref="AppendRefused"/>). Answered with <see cref="EventsAppended"/> once durable: that reply is
/// the commit point of whatever the events record.
/// </summary>
public sealed record AppendEvents(long RequestId, IReadOnlyList<ICoordinatorEvent> Events)
{
    public AppendEvents(long requestId, params ICoordinatorEvent[] events) : this(requestId, (IReadOnlyList<ICoordinatorEvent>)events) { }
}

/// <summary>The events of request <c>RequestId</c> are durable; <c>SequenceNr</c> is the last one's, <c>State</c> the state after them.</summary>
public sealed record EventsAppended(long RequestId, long SequenceNr, CoordinatorState State);

/// <summary>Nothing of request <c>RequestId</c> was written: the state refused an event, or the journal rejected the write.</summary>
public sealed record AppendRefused(long RequestId, string Reason);

/// <summary>Asks for the current <see cref="JournalState"/>.</summary>
public sealed record GetJournalState
{
    public static GetJournalState Instance { get; } = new();
}

/// <summary>
/// Asks for the events held in memory (every kind but <see cref="StepCommitted"/>) recorded at step <c>Since</c> or
/// later: answered with a <see cref="Protocol.ShellEvents"/> (the shell's <c>events</c>).
/// </summary>
public sealed record GetJournalEvents(long Since);

/// <summary>The journal's state and the sequence number of its last event.</summary>
public sealed record JournalState(CoordinatorState State, long SequenceNr);

/// <summary>
/// Sent to the listener once, when recovery is done: the state rebuilt from the newest snapshot (if any)
/// and the events after it. A journal that has never been written recovers <see cref="CoordinatorState.Empty"/>.
/// </summary>
public sealed record JournalRecovered(CoordinatorState State, long SequenceNr, long SnapshotSequenceNr, long EventsReplayed);

/// <summary>
/// The journal cannot be read (recovery) or written (a failed append): the journal actor stops after
/// sending this. A coordinator must not carry on without its journal, least of all from an empty state.
/// </summary>
public sealed record JournalFailed(string PersistenceId, string Reason, Exception Cause);

/// <summary>
/// The coordinator's event journal: persists <see cref="ICoordinatorEvent"/>s (Akka.Persistence, over
/// whichever plugin <see cref="JournalConfig"/> configured), snapshots the <see cref="CoordinatorState"/>
/// every <c>snapshotEvery</c> events, and on start rebuilds that state from the newest snapshot and the
/// events after it, by <see cref="CoordinatorState.Apply"/> alone.
/// </summary>
/// <remarks>
/// Meant to run as a child of the coordinator (the listener, by default the parent): the coordinator
/// waits for <see cref="JournalRecovered"/> before it plans anything, sends <see cref="AppendEvents"/>
/// at each commit point and acts on the commit only after <see cref="EventsAppended"/>, and watches the
/// journal: <see cref="JournalFailed"/> then termination means the run cannot be made durable. Requests
/// that arrive during recovery are stashed by Akka.Persistence and served after it. Nothing here blocks:
/// writes are asynchronous inside the persistence plugin and their results come back as messages.
/// </remarks>
public sealed class CoordinatorJournal : ReceivePersistentActor
{
    private sealed record Pending(long RequestId, IActorRef ReplyTo, int Count)
    {
        public int Done { get; set; }
        public string? Rejected { get; set; }
    }

    private readonly ILoggingAdapter _log = Context.GetLogger();
    private readonly IActorRef _listener;
    private readonly int _snapshotEvery;
    private readonly Queue<Pending> _pending = new();
    private CoordinatorState _state = CoordinatorState.Empty;
    private long _snapshotSequenceNr;
    private long _replayed;
    private int _sinceSnapshot;
    private long _previousSnapshotSequenceNr;
    // The events `events` shows, as replayed and written, the newest EventsKept (one line each).
    private readonly LinkedList<ShellEvent> _events = new();
    // The first sequence number _events covers: 1, or past the snapshot recovered from, or past what dropped out.
    private long _eventsFrom = 1;

    /// <summary>How many events <see cref="GetJournalEvents"/> can return (the oldest drop out).</summary>
    public const int EventsKept = 10_000;

    public CoordinatorJournal(string persistenceId, IActorRef? listener, int snapshotEvery)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(persistenceId);
        ArgumentOutOfRangeException.ThrowIfLessThan(snapshotEvery, 1);
        PersistenceId = persistenceId;
        _listener = listener ?? Context.Parent;
        _snapshotEvery = snapshotEvery;

        Recover<SnapshotOffer>(offer =>
        {
            _state = (CoordinatorState)offer.Snapshot;
            _snapshotSequenceNr = offer.Metadata.SequenceNr;
            _eventsFrom = _snapshotSequenceNr + 1;
        });
        Recover<ICoordinatorEvent>(e =>
        {
            Remember(e);
            _state = _state.Apply(e);
            _replayed++;
            _sinceSnapshot++;
        });
        Recover<RecoveryCompleted>(_ =>
        {
            _log.Info("coordinator journal {0} recovered at sequence {1}: snapshot at {2}, {3} events replayed, next step {4}",
                PersistenceId, LastSequenceNr, _snapshotSequenceNr, _replayed, _state.NextStep);
            _listener.Tell(new JournalRecovered(_state, LastSequenceNr, _snapshotSequenceNr, _replayed));
        });

        Command<AppendEvents>(Append);
        Command<GetJournalState>(_ => Sender.Tell(new JournalState(_state, LastSequenceNr)));
        Command<GetJournalEvents>(m => Sender.Tell(new ShellEvents(LastSequenceNr, _eventsFrom,
            _events.Where(x => x.AtStep >= m.Since).ToArray())));
        Command<SaveSnapshotSuccess>(ok =>
        {
            // Keep the newest two: the older one is there should the newest be unreadable.
            if (_previousSnapshotSequenceNr > 0)
                DeleteSnapshots(new SnapshotSelectionCriteria(_previousSnapshotSequenceNr - 1));
            _previousSnapshotSequenceNr = ok.Metadata.SequenceNr;
        });
        Command<SaveSnapshotFailure>(f =>
            _log.Warning("coordinator journal {0}: snapshot at sequence {1} failed ({2}); recovery replays more events until the next one",
                PersistenceId, f.Metadata.SequenceNr, f.Cause.Message));
        Command<DeleteSnapshotsSuccess>(_ => { });
        Command<DeleteSnapshotsFailure>(f =>
            _log.Warning("coordinator journal {0}: old snapshots not deleted ({1})", PersistenceId, f.Cause.Message));
    }

    public override string PersistenceId { get; }

    /// <param name="persistenceId">One per run (the same after every restart of the coordinator).</param>
    /// <param name="listener">Receives <see cref="JournalRecovered"/> and <see cref="JournalFailed"/>; null = the parent.</param>
    /// <param name="snapshotEvery">Save the state after this many events since the last snapshot.</param>
    public static Props Props(string persistenceId, IActorRef? listener = null, int snapshotEvery = 100) =>
        Akka.Actor.Props.Create(() => new CoordinatorJournal(persistenceId, listener, snapshotEvery));

    private void Append(AppendEvents request)
    {
        var events = request.Events;
        try
        {
            foreach (var e in events)
            {
                ArgumentNullException.ThrowIfNull(e);
                CoordinatorJournalCodec.ManifestOf(e.GetType()); // an event the journal could not store
            }
            _ = events.Aggregate(_state, (s, e) => s.Apply(e));
        }
        catch (Exception ex) when (ex is InvalidOperationException or ArgumentException)
        {
            Sender.Tell(new AppendRefused(request.RequestId, ex.Message));
            return;
        }
        if (events.Count == 0)
        {
            // Ordered after every earlier append: a deferred no-op runs once those are written.
            var replyTo = Sender;
            DeferAsync(request, _ => replyTo.Tell(new EventsAppended(request.RequestId, LastSequenceNr, _state)));
            return;
        }
        _pending.Enqueue(new Pending(request.RequestId, Sender, events.Count));
        PersistAll(events, e =>
        {
            Remember(e);
            _state = _state.Apply(e);
            _sinceSnapshot++;
            Settle(rejected: null);
        });
    }

    // Called before the event is applied (AtStep: the steps committed when it was recorded), with LastSequenceNr its own.
    private void Remember(ICoordinatorEvent e)
    {
        if (e is StepCommitted) return;   // one a step: `train status` and the metrics file have those
        _events.AddLast(new ShellEvent(LastSequenceNr, _state.NextStep, CoordinatorEventText.KindOf(e), CoordinatorEventText.Describe(e)));
        if (_events.Count <= EventsKept) return;
        _eventsFrom = _events.First!.Value.SequenceNr + 1;
        _events.RemoveFirst();
    }

    // One event of the oldest pending append is written or rejected; answer once all of its events are.
    private void Settle(string? rejected)
    {
        var head = _pending.Peek();
        head.Done++;
        head.Rejected ??= rejected;
        if (head.Done < head.Count) return;
        _pending.Dequeue();
        if (head.Rejected is not null)
        {
            head.ReplyTo.Tell(new AppendRefused(head.RequestId, head.Rejected));
            return;
        }
        head.ReplyTo.Tell(new EventsAppended(head.RequestId, LastSequenceNr, _state));
        if (_sinceSnapshot >= _snapshotEvery)
        {
            SaveSnapshot(_state);
            _sinceSnapshot = 0;
        }
    }

    protected override void OnRecoveryFailure(Exception reason, object? message = null)
    {
        var what = message is null ? "" : $" at {message.GetType().Name}";
        Fail($"recovery failed{what}: {reason.Message}", reason);
        base.OnRecoveryFailure(reason, message);
    }

    protected override void OnPersistFailure(Exception cause, object @event, long sequenceNr)
    {
        Fail($"writing {@event.GetType().Name} (sequence {sequenceNr}) failed: {cause.Message}", cause);
        base.OnPersistFailure(cause, @event, sequenceNr);
    }

    protected override void OnPersistRejected(Exception cause, object @event, long sequenceNr)
    {
        // The journal refused the write (nothing was stored): the actor goes on, the requester hears why.
        _log.Error(cause, "coordinator journal {0}: {1} (sequence {2}) rejected", PersistenceId, @event.GetType().Name, sequenceNr);
        Settle($"the journal rejected {@event.GetType().Name}: {cause.Message}");
    }

    private void Fail(string reason, Exception cause)
    {
        var message = $"coordinator journal {PersistenceId}: {reason}";
        _log.Error(cause, message);
        _listener.Tell(new JournalFailed(PersistenceId, message, cause));
        foreach (var p in _pending) p.ReplyTo.Tell(new AppendRefused(p.RequestId, message));
        _pending.Clear();
    }
}
