using Akka.Actor;
using ElasticMoE.Runtime.Coordination;
using ElasticMoE.Runtime.Journal;
using Microsoft.Data.Sqlite;
using static ElasticMoE.Tests.Journal.JournalTestKit;

namespace ElasticMoE.Tests.Journal;

/// <summary>The coordinator journal over SQLite files in a run directory: written by one actor system, recovered by another.</summary>
public sealed class SqliteJournalTests : IDisposable
{
    private readonly TempRunDir _dir = new();
    private string RunDir => _dir.Path;

    public void Dispose() => _dir.Dispose();

    [Fact]
    public async Task Events_written_by_one_system_rebuild_the_same_state_in_a_new_one()
    {
        var history = History();
        var first = NewSystem(JournalConfig.Sqlite(RunDir));
        var (journal, outcome) = await Start(first, "run-1");
        var fresh = Assert.IsType<JournalRecovered>(outcome);
        Assert.Equal(0, fresh.SequenceNr);
        AssertSameState(CoordinatorState.Empty, fresh.State);

        var appended = await AppendAll(journal, history);
        Assert.Equal(history.Count, appended.SequenceNr);
        AssertSameState(Replay(history), appended.State);
        // Gone without a goodbye: no snapshot, no graceful stop of the journal actor.
        await first.Terminate();

        var (events, snapshots) = JournalConfig.SqliteFiles(RunDir);
        Assert.True(File.Exists(events) && File.Exists(snapshots), "journal and snapshots live in their own files under the run dir");

        var second = NewSystem(JournalConfig.Sqlite(RunDir));
        try
        {
            var again = await Recovered(second, "run-1");
            Assert.Equal(history.Count, again.SequenceNr);
            Assert.Equal(history.Count, again.EventsReplayed);
            Assert.Equal(0, again.SnapshotSequenceNr);
            AssertSameState(Replay(history), again.State);
            // Another run's journal in the same files is separate.
            Assert.Equal(0, (await Recovered(second, "run-other")).SequenceNr);
        }
        finally { await second.Terminate(); }
    }

    [Fact]
    public async Task Recovery_starts_from_the_newest_snapshot_and_replays_only_later_events()
    {
        var history = History();
        // Batches of 3: atomic writes of several events, and snapshots that fall between batches.
        var (written, again) = await WriteThenRecover(() => JournalConfig.Sqlite(RunDir), "run-2", history, snapshotEvery: 10, batch: 3);
        AssertRecoveredFromSnapshot(history, written, again);
    }

    [Fact]
    public async Task Events_the_state_refuses_are_not_written()
    {
        var system = NewSystem(JournalConfig.Sqlite(RunDir));
        try
        {
            var (journal, _) = await Start(system, "run-3");
            var history = History(6);
            await AppendAll(journal, history);
            var next = Replay(history).NextStep;
            // A batch whose second event skips a step: the whole batch is refused, nothing of it is written.
            var refused = await journal.Ask<object>(new AppendEvents(42, new StepCommitted(Step(next), 1), new StepCommitted(Step(next + 2), 1)), Patience);
            var r = Assert.IsType<AppendRefused>(refused);
            Assert.Equal(42, r.RequestId);
            Assert.Contains($"step {next + 2}", r.Reason);
            var state = await journal.Ask<JournalState>(GetJournalState.Instance, Patience);
            Assert.Equal(history.Count, state.SequenceNr);
            Assert.Equal(next, state.State.NextStep);

            var ok = await journal.Ask<object>(new AppendEvents(43, new StepCommitted(Step(next), 2)), Patience);
            Assert.Equal(next + 1, Assert.IsType<EventsAppended>(ok).State.NextStep);
            var empty = await journal.Ask<object>(new AppendEvents(44), Patience);
            Assert.Equal(history.Count + 1, Assert.IsType<EventsAppended>(empty).SequenceNr);
        }
        finally { await system.Terminate(); }
    }

    [Fact]
    public async Task A_corrupt_event_stops_recovery_with_a_reason_naming_the_record()
    {
        var history = History(6);
        var first = NewSystem(JournalConfig.Sqlite(RunDir));
        var (journal, _) = await Start(first, "run-4");
        await AppendAll(journal, history);
        await first.Terminate();
        SqliteConnection.ClearAllPools();

        // Damage the stored bytes of event 5 (a StepCommitted): its msgpack array header now claims 200 elements.
        var events = JournalConfig.SqliteFiles(RunDir).Events;
        using (var db = new SqliteConnection($"Data Source={events}"))
        {
            db.Open();
            using var read = db.CreateCommand();
            read.CommandText = "SELECT message FROM journal WHERE persistence_id = 'run-4' AND sequence_number = 5";
            var bytes = (byte[])read.ExecuteScalar()!;
            Assert.Equal(0x92, bytes[0]); // fixarray of 2: (result, attempts)
            byte[] damaged = [0xDC, 0x00, 0xC8, .. bytes.AsSpan(1)];
            using var write = db.CreateCommand();
            write.CommandText = "UPDATE journal SET message = $m WHERE persistence_id = 'run-4' AND sequence_number = 5";
            write.Parameters.AddWithValue("$m", damaged);
            Assert.Equal(1, write.ExecuteNonQuery());
        }
        SqliteConnection.ClearAllPools();

        var second = NewSystem(JournalConfig.Sqlite(RunDir));
        try
        {
            var (_, outcome) = await Start(second, "run-4");
            var failed = Assert.IsType<JournalFailed>(outcome);
            Assert.Contains("recovery failed", failed.Reason);
            Assert.Contains("Corrupt coordinator journal record 'j.StepCommitted'", failed.Reason);
        }
        finally { await second.Terminate(); }
    }
}
