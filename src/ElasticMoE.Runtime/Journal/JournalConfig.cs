using Akka.Configuration;
using Akka.Persistence.Sql;
using ElasticMoE.Runtime.Serialization;
using Microsoft.Data.Sqlite;

namespace ElasticMoE.Runtime.Journal;

/// <summary>
/// Akka.Persistence configuration for the coordinator journal: Akka.Persistence.Sql with SQLite files in
/// the run directory by default (embedded, nothing to install), or PostgreSQL through the
/// <c>hocon/postgres.conf</c> overlay. Every config returned here is complete for an actor system: the
/// plugin settings, our serializers (events and snapshots are MessagePack) and Akka.Persistence.Sql's
/// reference settings as the fallback.
/// </summary>
public static class JournalConfig
{
    /// <summary>Folder of the run directory that holds the SQLite journal.</summary>
    public const string Folder = "journal";
    /// <summary>The events (Akka.Persistence.Sql's journal tables).</summary>
    public const string EventsFile = "events.db";
    /// <summary>The snapshots, in a file of their own so a snapshot write never contends with an event append.</summary>
    public const string SnapshotsFile = "snapshots.db";

    /// <summary>
    /// Where the connection string comes from when the config leaves it empty (as <c>hocon/postgres.conf</c>
    /// does): a password need not be written into a file. Read here, since Akka's HOCON has no environment lookup.
    /// </summary>
    public const string PostgresEnvironmentVariable = "ELASTICMOE_JOURNAL_POSTGRES";

    private const string JournalPath = "akka.persistence.journal.sql";
    private const string SnapshotPath = "akka.persistence.snapshot-store.sql";
    private const string PostgresResource = "ElasticMoE.postgres.conf";

    private static readonly Lazy<string> PostgresText = new(() =>
    {
        using var s = typeof(JournalConfig).Assembly.GetManifestResourceStream(PostgresResource)
            ?? throw new InvalidOperationException($"embedded resource {PostgresResource} is missing");
        using var r = new StreamReader(s);
        return r.ReadToEnd();
    });

    /// <summary>The SQLite files of a run directory: (events, snapshots).</summary>
    public static (string Events, string Snapshots) SqliteFiles(string runDir)
    {
        var dir = Path.Combine(Path.GetFullPath(runDir), Folder);
        return (Path.Combine(dir, EventsFile), Path.Combine(dir, SnapshotsFile));
    }

    /// <summary>Journal and snapshot store in SQLite files under <paramref name="runDir"/>/journal (created if missing).</summary>
    public static Config Sqlite(string runDir)
    {
        var (events, snapshots) = SqliteFiles(runDir);
        Directory.CreateDirectory(Path.GetDirectoryName(events)!);
        var hocon = $$"""
            akka.persistence {
              journal {
                plugin = "{{JournalPath}}"
                sql {
                  provider-name = "SQLite.MS"
                  connection-string = {{Quote(SqliteConnectionString(events))}}
                  # One writer: SQLite takes one write transaction at a time anyway.
                  parallelism = 1
                }
              }
              snapshot-store {
                plugin = "{{SnapshotPath}}"
                sql {
                  provider-name = "SQLite.MS"
                  connection-string = {{Quote(SqliteConnectionString(snapshots))}}
                }
              }
            }
            """;
        return Complete(ConfigurationFactory.ParseString(hocon));
    }

    /// <summary>
    /// The PostgreSQL journal: <c>hocon/postgres.conf</c>, with <paramref name="connectionString"/> when
    /// given, else the one in <see cref="PostgresEnvironmentVariable"/>.
    /// </summary>
    /// <exception cref="ConfigurationException">No connection string is given or set.</exception>
    public static Config Postgres(string? connectionString = null)
    {
        var overlay = PostgresOverlay;
        if (connectionString is not null) overlay = WithConnectionString(overlay, connectionString, JournalPath, SnapshotPath);
        return Checked(Complete(overlay));
    }

    /// <summary><c>hocon/postgres.conf</c> as shipped (embedded in this assembly).</summary>
    public static Config PostgresOverlay => ConfigurationFactory.ParseString(PostgresText.Value);

    /// <summary>
    /// A user overlay (a <c>--config</c> file that sets <c>akka.persistence</c>, such as <c>hocon/postgres.conf</c>)
    /// laid over the default SQLite journal of <paramref name="runDir"/>.
    /// </summary>
    public static Config WithOverlay(Config overlay, string runDir) => Checked(overlay.WithFallback(Sqlite(runDir)));

    private static Config Complete(Config persistence) =>
        persistence.WithFallback(ElasticMoESerialization.Config).WithFallback(SqlPersistence.DefaultConfiguration);

    // Empty connection strings take the environment's; any still empty is an error naming both places.
    private static Config Checked(Config config)
    {
        var empty = new[] { JournalPath, SnapshotPath }.Where(p => string.IsNullOrWhiteSpace(config.GetString($"{p}.connection-string"))).ToArray();
        if (empty.Length == 0) return config;
        var fromEnvironment = Environment.GetEnvironmentVariable(PostgresEnvironmentVariable);
        if (string.IsNullOrWhiteSpace(fromEnvironment))
            throw new ConfigurationException(
                $"{empty[0]}.connection-string is empty: set it in the overlay or in the environment variable {PostgresEnvironmentVariable}");
        return WithConnectionString(config, fromEnvironment, empty);
    }

    private static Config WithConnectionString(Config config, string connectionString, params string[] paths) =>
        ConfigurationFactory.ParseString(string.Join("\n", paths.Select(p => $"{p}.connection-string = {Quote(connectionString)}")))
            .WithFallback(config);

    private static string SqliteConnectionString(string file) =>
        new SqliteConnectionStringBuilder { DataSource = file, Mode = SqliteOpenMode.ReadWriteCreate }.ToString();

    private static string Quote(string s) => "\"" + s.Replace("\\", "\\\\").Replace("\"", "\\\"") + "\"";
}
