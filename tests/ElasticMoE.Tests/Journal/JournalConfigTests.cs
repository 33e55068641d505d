using Akka.Configuration;
using ElasticMoE.Runtime.Journal;
using static ElasticMoE.Tests.Journal.JournalTestKit;

namespace ElasticMoE.Tests.Journal;

public sealed class JournalConfigTests : IDisposable
{
    private readonly TempRunDir _dir = new();

    public void Dispose() => _dir.Dispose();

    [Fact]
    public void Sqlite_puts_journal_and_snapshots_in_separate_files_of_the_run_dir()
    {
        var runDir = Path.Combine(_dir.Path, "a run \"dir\" with; odd chars");
        var config = JournalConfig.Sqlite(runDir);
        var (events, snapshots) = JournalConfig.SqliteFiles(runDir);
        Assert.Equal("akka.persistence.journal.sql", config.GetString("akka.persistence.journal.plugin"));
        Assert.Equal("akka.persistence.snapshot-store.sql", config.GetString("akka.persistence.snapshot-store.plugin"));
        Assert.Equal("SQLite.MS", config.GetString("akka.persistence.journal.sql.provider-name"));
        Assert.Contains(events, config.GetString("akka.persistence.journal.sql.connection-string"));
        Assert.Contains(snapshots, config.GetString("akka.persistence.snapshot-store.sql.connection-string"));
        Assert.NotEqual(events, snapshots);
        Assert.True(Directory.Exists(Path.GetDirectoryName(events)));
        // Complete for an actor system: the plugin's reference settings and our serializers are there.
        Assert.Equal("Akka.Persistence.Sql.Journal.SqlWriteJournal, Akka.Persistence.Sql", config.GetString("akka.persistence.journal.sql.class"));
        Assert.Equal("elasticmoe-journal", config.GetString("akka.actor.serialization-bindings.\"ElasticMoE.Runtime.Coordination.ICoordinatorEvent, ElasticMoE.Runtime\""));
    }

    [Fact]
    public async Task A_path_with_odd_characters_still_journals()
    {
        var runDir = Path.Combine(_dir.Path, "a run \"dir\" with; odd chars");
        var history = History(3);
        var (_, again) = await WriteThenRecover(() => JournalConfig.Sqlite(runDir), "odd", history, snapshotEvery: 100, batch: 1);
        AssertSameState(Replay(history), again.State);
        Assert.True(File.Exists(JournalConfig.SqliteFiles(runDir).Events));
    }

    [Fact]
    public void Postgres_needs_a_connection_string_and_says_where_to_put_it()
    {
        var before = Environment.GetEnvironmentVariable(JournalConfig.PostgresEnvironmentVariable);
        Environment.SetEnvironmentVariable(JournalConfig.PostgresEnvironmentVariable, null);
        try
        {
            var ex = Assert.Throws<ConfigurationException>(() => JournalConfig.Postgres());
            Assert.Contains(JournalConfig.PostgresEnvironmentVariable, ex.Message);

            var explicitly = JournalConfig.Postgres("Host=db;Database=x");
            Assert.Equal("PostgreSQL.15", explicitly.GetString("akka.persistence.journal.sql.provider-name"));
            Assert.Equal("Host=db;Database=x", explicitly.GetString("akka.persistence.journal.sql.connection-string"));
            Assert.Equal("Host=db;Database=x", explicitly.GetString("akka.persistence.snapshot-store.sql.connection-string"));

            Environment.SetEnvironmentVariable(JournalConfig.PostgresEnvironmentVariable, "Host=from-env");
            Assert.Equal("Host=from-env", JournalConfig.Postgres().GetString("akka.persistence.snapshot-store.sql.connection-string"));
            // As an overlay over the run dir's SQLite default: PostgreSQL wins.
            var laid = JournalConfig.WithOverlay(JournalConfig.PostgresOverlay, _dir.Path);
            Assert.Equal("Host=from-env", laid.GetString("akka.persistence.journal.sql.connection-string"));
            Assert.Equal("PostgreSQL.15", laid.GetString("akka.persistence.snapshot-store.sql.provider-name"));
        }
        finally { Environment.SetEnvironmentVariable(JournalConfig.PostgresEnvironmentVariable, before); }
    }
}
