using System.ComponentModel;
using System.Diagnostics;
using Npgsql;
using ElasticMoE.Runtime.Hosting;

namespace ElasticMoE.Tests.Journal;

/// <summary>
/// Finds the PostgreSQL server programs (Debian's package puts them under /usr/lib/postgresql/N/bin, off
/// the PATH) and says why the PostgreSQL tests cannot run, when they cannot.
/// </summary>
internal static class PostgresBinaries
{
    private static readonly Lazy<(string? Bin, string? SkipReason)> Probe = new(Find);

    /// <summary>The folder with initdb and pg_ctl.</summary>
    public static string? Bin => Probe.Value.Bin;

    /// <summary>Null when a throwaway server can be started; else why not.</summary>
    public static string? SkipReason => Probe.Value.SkipReason;

    /// <summary>initdb and the server refuse to run as root: then they run as this user, through runuser.</summary>
    public static string? RunAs => Environment.UserName == "root" ? "postgres" : null;

    private static (string?, string?) Find()
    {
        var candidates = (Environment.GetEnvironmentVariable("PATH") ?? "").Split(':', StringSplitOptions.RemoveEmptyEntries)
            .Concat(Directory.Exists("/usr/lib/postgresql")
                ? Directory.GetDirectories("/usr/lib/postgresql").OrderByDescending(VersionOf).Select(d => Path.Combine(d, "bin"))
                : []);
        var bin = candidates.FirstOrDefault(d => File.Exists(Path.Combine(d, "initdb")) && File.Exists(Path.Combine(d, "pg_ctl")));
        if (bin is null)
            return (null, "PostgreSQL server programs (initdb, pg_ctl) are not installed, neither on the PATH nor under /usr/lib/postgresql/*/bin; " +
                          ".ci/run installs them (apt-get install -y postgresql)");
        if (RunAs is { } user)
        {
            if (!File.Exists("/usr/sbin/runuser") && !File.Exists("/sbin/runuser"))
                return (null, "running as root, and runuser (needed to start PostgreSQL as another user) is missing");
            if (!File.ReadLines("/etc/passwd").Any(l => l.StartsWith(user + ":", StringComparison.Ordinal)))
                return (null, $"running as root, and there is no '{user}' user to run PostgreSQL as (initdb refuses root)");
        }
        return (bin, null);
    }

    private static int VersionOf(string dir) => int.TryParse(Path.GetFileName(dir), out var v) ? v : 0;
}

/// <summary>A fact that xunit reports as skipped, with the reason, where no throwaway PostgreSQL can be started.</summary>
public sealed class PostgresFactAttribute : FactAttribute
{
    public PostgresFactAttribute()
    {
        if (PostgresBinaries.SkipReason is { } reason) Skip = reason;
    }
}

[CollectionDefinition(Name)]
public sealed class PostgresCollection : ICollectionFixture<PostgresServer>
{
    public const string Name = "PostgreSQL server";
}

/// <summary>
/// A throwaway PostgreSQL cluster for the tests: initdb in a temporary folder, a server on a free local
/// port (and its socket in that folder), a fresh database per test; stopped and removed afterwards.
/// Where the programs are installed but the server does not come up, the tests fail with its log:
/// only a missing installation is a skip (<see cref="PostgresFactAttribute"/>).
/// </summary>
public sealed class PostgresServer : IAsyncLifetime
{
    private static readonly TimeSpan CommandTimeout = TimeSpan.FromSeconds(60);
    private const string Prefix = "elasticmoe-pg-";
    private readonly string _root = Path.Combine(Path.GetTempPath(), $"{Prefix}{Guid.NewGuid():N}");
    private bool _started;
    private int _databases;

    public int Port { get; private set; }

    private string DataDir => Path.Combine(_root, "data");

    private string AdminConnectionString => $"Host=127.0.0.1;Port={Port};Username=postgres;Database=postgres;Pooling=false;Timeout=30";

    public async Task InitializeAsync()
    {
        if (PostgresBinaries.SkipReason is not null) return; // every test of the collection is skipped, and says why
        Directory.CreateDirectory(_root);
        await File.WriteAllTextAsync(Path.Combine(_root, "owner"), Environment.ProcessId.ToString());
        if (PostgresBinaries.RunAs is { } user) await Run("chown", [$"{user}:", _root], asUser: false);
        await RemoveAbandoned();
        await Run(Program("initdb"), ["-D", DataDir, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-locale", "--no-sync"]);
        Port = LoopbackPorts.Next();
        // fsync off: these tests check the journal's logic against a real server, not the server's own durability.
        var options = $"-p {Port} -k {_root} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off";
        try
        {
            await Run(Program("pg_ctl"), ["-D", DataDir, "-l", Path.Combine(_root, "server.log"), "-w", "-t", "60", "-o", options, "start"]);
        }
        catch (Exception ex)
        {
            var log = Path.Combine(_root, "server.log");
            throw new InvalidOperationException($"PostgreSQL did not start: {ex.Message}\n{(File.Exists(log) ? File.ReadAllText(log) : "(no server log)")}", ex);
        }
        _started = true;
    }

    /// <summary>Creates an empty database and returns the connection string to it.</summary>
    public async Task<string> CreateDatabaseAsync()
    {
        var name = $"journal_{Interlocked.Increment(ref _databases)}";
        await using (var admin = new NpgsqlConnection(AdminConnectionString))
        {
            await admin.OpenAsync();
            await using var cmd = new NpgsqlCommand($"CREATE DATABASE {name}", admin);
            await cmd.ExecuteNonQueryAsync();
        }
        return $"Host=127.0.0.1;Port={Port};Username=postgres;Database={name};Timeout=30";
    }

    public async Task DisposeAsync()
    {
        NpgsqlConnection.ClearAllPools();
        try
        {
            if (_started) await Run(Program("pg_ctl"), ["-D", DataDir, "-m", "immediate", "-w", "stop"]);
        }
        finally
        {
            if (Directory.Exists(_root)) Directory.Delete(_root, recursive: true);
        }
    }

    /// <summary>Stops and removes the clusters of test processes that died before their cleanup (a crashed test host).</summary>
    private async Task RemoveAbandoned()
    {
        foreach (var dir in Directory.GetDirectories(Path.GetTempPath(), Prefix + "*"))
        {
            var owner = Path.Combine(dir, "owner");
            if (!File.Exists(owner) || !int.TryParse(File.ReadAllText(owner), out var pid) || Directory.Exists($"/proc/{pid}")) continue;
            if (File.Exists(Path.Combine(dir, "data", "postmaster.pid")))
            {
                try { await Run(Program("pg_ctl"), ["-D", Path.Combine(dir, "data"), "-m", "immediate", "-w", "stop"]); }
                catch (InvalidOperationException) { } // not running any more
            }
            Directory.Delete(dir, recursive: true);
        }
    }

    private static string Program(string name) => Path.Combine(PostgresBinaries.Bin!, name);

    private async Task Run(string program, string[] arguments, bool asUser = true)
    {
        var psi = new ProcessStartInfo
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
            WorkingDirectory = _root, // readable by the server's user, unlike the test's own folder
        };
        if (asUser && PostgresBinaries.RunAs is { } user)
        {
            psi.FileName = "runuser";
            foreach (var a in new[] { "-u", user, "--", program }) psi.ArgumentList.Add(a);
        }
        else psi.FileName = program;
        foreach (var a in arguments) psi.ArgumentList.Add(a);
        using var p = Process.Start(psi) ?? throw new Win32Exception($"could not start {program}");
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        using var timeout = new CancellationTokenSource(CommandTimeout);
        try { await p.WaitForExitAsync(timeout.Token); }
        catch (OperationCanceledException)
        {
            p.Kill(entireProcessTree: true);
            throw new TimeoutException($"{Path.GetFileName(program)} did not finish in {CommandTimeout.TotalSeconds} s");
        }
        if (p.ExitCode != 0)
            throw new InvalidOperationException($"{Path.GetFileName(program)} exited {p.ExitCode}: {await stderr}{await stdout}");
    }

}
