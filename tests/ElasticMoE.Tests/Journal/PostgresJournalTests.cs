using ElasticMoE.Runtime.Journal;
using static ElasticMoE.Tests.Journal.JournalTestKit;

namespace ElasticMoE.Tests.Journal;

/// <summary>The coordinator journal over a real PostgreSQL server (a throwaway cluster, <see cref="PostgresServer"/>).</summary>
[Collection(PostgresCollection.Name)]
public sealed class PostgresJournalTests(PostgresServer server)
{
    [PostgresFact]
    public async Task Events_and_snapshots_written_by_one_system_rebuild_the_same_state_in_a_new_one()
    {
        var connection = await server.CreateDatabaseAsync();
        var history = History();
        var (written, again) = await WriteThenRecover(() => JournalConfig.Postgres(connection), "run-pg", history, snapshotEvery: 10, batch: 3);
        AssertRecoveredFromSnapshot(history, written, again);
    }

    [PostgresFact]
    public async Task The_overlay_takes_its_connection_string_from_the_environment()
    {
        var connection = await server.CreateDatabaseAsync();
        var history = History(6);
        var before = Environment.GetEnvironmentVariable(JournalConfig.PostgresEnvironmentVariable);
        Environment.SetEnvironmentVariable(JournalConfig.PostgresEnvironmentVariable, connection);
        try
        {
            // Every event its own write, no snapshot: recovery replays them all.
            var (_, again) = await WriteThenRecover(() => JournalConfig.Postgres(), "run-env", history, snapshotEvery: 1000, batch: 1);
            Assert.Equal(history.Count, again.EventsReplayed);
            AssertSameState(Replay(history), again.State);
        }
        finally { Environment.SetEnvironmentVariable(JournalConfig.PostgresEnvironmentVariable, before); }
    }
}
