using System.Diagnostics;
using System.Text;
using System.Text.Json;
using ElasticMoE.Checkpointing;
using ElasticMoE.Tests.Journal;
using ElasticMoE.Training;
using Xunit.Abstractions;
using ElasticMoE.Runtime.Hosting;

namespace ElasticMoE.Tests.Cluster;

/// <summary>
/// Checkpoints of a cluster run, with node processes: the whole job SIGKILLed after a committed checkpoint,
/// then `elasticmoe train --run-dir` again on another number of nodes continues the same curve.
/// </summary>
[Collection("cluster")]
public class ResumeTests(ITestOutputHelper output)
{
    private const int Steps = 40;

    private static Dictionary<string, string> Settings() => TestSupport.SmallSettings(
        ("seed", "1"), ("model.layers", "4"), ("model.dense-layers", "1"), ("model.moe.routed-experts", "6"),
        ("train.global-batch", "12"), ("train.micro-batch", "2"), ("train.steps", Steps.ToString()), ("train.eval-every", "10"),
        ("train.eval-batches", "2"), ("cluster.checksum-every", "5"), ("checkpoint.every", "10"), ("cluster.join-settle", "0"));

    private static readonly Lazy<IReadOnlyList<StepResult>> Reference =
        new(() => SingleProcessReference.Train(TestSupport.SmallConfig(Settings().Select(kv => (kv.Key, kv.Value)).ToArray()), Steps).Steps);

    private sealed record Job(Process Coordinator, Process[] Nodes, StringBuilder Text, string Metrics, Task Pump);

    /// <param name="port">The coordinator's port (default a free one).</param>
    /// <param name="running">Node processes already running (joined to a coordinator on <paramref name="port"/> before): no new ones are started.</param>
    private static Job Start(string runDir, int nodes, string[] extra, Action<string, Job>? onLine = null, int? port = null, Process[]? running = null)
    {
        TestSupport.EnsureTorch();
        var args = RunArguments();
        int coordinatorPort = port ?? LoopbackPorts.Next();
        var metrics = Path.Combine(TestSupport.TempDir(), "metrics.jsonl");
        var coordinator = NodeProcesses.Start(["train", "--nodes", "0", "--expect-nodes", nodes.ToString(), "--port", coordinatorPort.ToString(),
            "--metrics", metrics, "--run-dir", runDir, .. args, .. extra]);
        var seed = Address(coordinatorPort);
        var procs = running ?? Enumerable.Range(0, nodes).Select(_ => StartNode(seed)).ToArray();
        var text = new StringBuilder();
        Job? job = null;
        var pump = Task.Run(async () =>
        {
            var err = coordinator.StandardError.ReadToEndAsync();
            string? line;
            while ((line = await coordinator.StandardOutput.ReadLineAsync()) is not null)
            {
                lock (text) text.AppendLine(line);
                while (job is null) await Task.Delay(1);
                onLine?.Invoke(line, job);
            }
            var rest = await err;
            lock (text) text.AppendLine(rest);
        });
        job = new Job(coordinator, procs, text, metrics, pump);
        return job;
    }

    private static string[] RunArguments() => TestSupport.SetArguments(Settings()).Concat(["--threads", "1"]).ToArray();

    private static Process StartNode(params string[] seeds)
        => NodeProcesses.Start(["node", .. seeds.SelectMany(s => new[] { "--seed-node", s }), .. RunArguments()]);

    private static string Address(int port) => $"akka.tcp://elasticmoe@127.0.0.1:{port}";

    private static void KillAll(Job job)
    {
        foreach (var p in job.Nodes.Append(job.Coordinator))
            if (!p.HasExited) p.Kill(entireProcessTree: true);
    }

    private async Task<string> Finish(Job job, TimeSpan timeout)
    {
        using var cts = new CancellationTokenSource(timeout);
        try { await job.Coordinator.WaitForExitAsync(cts.Token); }
        finally { KillAll(job); }
        await job.Pump;
        var text = job.Text.ToString();
        output.WriteLine(text);
        return text;
    }

    private static void CopyDirectory(string from, string to)
    {
        foreach (var dir in Directory.GetDirectories(from, "*", SearchOption.AllDirectories))
            Directory.CreateDirectory(dir.Replace(from, to));
        Directory.CreateDirectory(to);
        foreach (var file in Directory.GetFiles(from, "*", SearchOption.AllDirectories))
            File.Copy(file, file.Replace(from, to));
    }

    // Every step line of the metrics (1-based step numbers) equals the reference's step within 1e-4.
    private static List<int> AssertStepsMatchReference(string metrics)
    {
        var lines = File.ReadAllLines(metrics).Select(l => JsonDocument.Parse(l).RootElement).Where(l => !l.TryGetProperty("event", out _)).ToList();
        var steps = lines.Select(l => l.GetProperty("step").GetInt32()).ToList();
        var reference = Reference.Value;
        SingleProcessReference.AssertStepsMatch(metrics,
            lines.Select(l => (l.GetProperty("loss").GetDouble(), l.GetProperty("grad_norm").GetDouble())).ToList(),
            steps.Select(s => reference[s - 1]).ToList());
        return steps;
    }

    /// <summary>Runs until the checkpoint of step 20 is committed, then SIGKILLs coordinator and nodes at once.</summary>
    private async Task<string> TrainAndKillEverything(string runDir, int nodes, string[]? extra = null)
    {
        var committed = new TaskCompletionSource();
        var job = Start(runDir, nodes, extra ?? [], (line, _) =>
        {
            if (line.StartsWith("checkpoint of step 20 committed", StringComparison.Ordinal)) committed.TrySetResult();
        });
        try
        {
            await committed.Task.WaitAsync(TimeSpan.FromMinutes(3));
        }
        finally
        {
            KillAll(job);
        }
        await job.Pump;
        output.WriteLine(job.Text.ToString());
        var store = new CheckpointStore(runDir);
        Assert.Contains(store.List(), c => c.Step == 20);
        return job.Text.ToString();
    }

    [Fact]
    public async Task A_job_killed_after_a_checkpoint_resumes_on_1_2_and_4_nodes_with_the_same_curve()
    {
        var first = Path.Combine(TestSupport.TempDir(), "run");
        await TrainAndKillEverything(first, 3);
        foreach (int nodes in new[] { 1, 2, 4 })
        {
            var dir = Path.Combine(TestSupport.TempDir(), $"run-{nodes}");
            CopyDirectory(first, dir);
            var job = Start(dir, nodes, []);
            var text = await Finish(job, TimeSpan.FromMinutes(3));
            Assert.True(job.Coordinator.ExitCode == 0, text);
            Assert.Contains("resuming from checkpoint", text);
            var steps = AssertStepsMatchReference(job.Metrics);
            // The newest committed checkpoint is step 20 or (if its write finished before the kill) 30.
            Assert.Equal(Enumerable.Range(steps[0], Steps - steps[0] + 1), steps);
            Assert.True(steps[0] is 21 or 31, $"resumed at step {steps[0]}");
            // Its own checkpoints were committed and verify.
            var store = new CheckpointStore(dir);
            Assert.Contains(store.List(), c => c.Step == Steps);
            Assert.Empty(store.Verify(Steps));
            Assert.True(store.List().Count <= 2, "checkpoint.keep = 2");
        }
    }

    private const string KillCoordinatorAs21Starts = "cluster.fault-injection=step=20,phase=forward,worker=coordinator,action=kill";

    /// <summary>
    /// Trains on two node processes until the coordinator's process SIGKILLs itself (<paramref name="fault"/>),
    /// then starts the same command again on the same port while the nodes keep running, and lets it finish.
    /// Returns the first and second coordinators' metrics and the second's output.
    /// </summary>
    private async Task<(string FirstMetrics, string SecondMetrics, string Text, Job Second)> KillCoordinatorAndStartAgain(string fault)
    {
        var dir = Path.Combine(TestSupport.TempDir(), "run");
        int port = LoopbackPorts.Next();
        var first = Start(dir, 2, ["--set", fault], port: port);
        Job second;
        try
        {
            await first.Coordinator.WaitForExitAsync().WaitAsync(TimeSpan.FromMinutes(3));
            await first.Pump;
            output.WriteLine(first.Text.ToString());
            Assert.Contains("fault injection: killing the coordinator's process", first.Text.ToString());
            Assert.All(first.Nodes, n => Assert.False(n.HasExited, "a node ended with its coordinator"));
            second = Start(dir, 2, [], port: port, running: first.Nodes);
        }
        catch
        {
            KillAll(first);
            throw;
        }
        var text = await Finish(second, TimeSpan.FromMinutes(3));
        Assert.True(second.Coordinator.ExitCode == 0, text);
        return (first.Metrics, second.Metrics, text, second);
    }

    [Fact]
    public async Task A_killed_coordinator_started_again_re_attaches_the_running_nodes_and_redoes_only_the_step_in_flight()
    {
        var (firstMetrics, secondMetrics, text, _) = await KillCoordinatorAndStartAgain(KillCoordinatorAs21Starts);
        Assert.Contains("re-attached: 2 of 2 worker(s)", text);
        Assert.DoesNotContain("resuming from checkpoint", text);
        var before = AssertStepsMatchReference(firstMetrics);
        var after = AssertStepsMatchReference(secondMetrics);
        Assert.Equal(Enumerable.Range(1, 20), before);
        // Step 21 was in flight when the coordinator died: it is the one step done again, nothing else.
        Assert.Equal(Enumerable.Range(21, Steps - 20), after);
    }

    [Fact]
    public Task A_stand_by_coordinator_takes_the_run_over_when_the_coordinators_process_is_killed()
        => StandbyTakesOver(Path.Combine(TestSupport.TempDir(), "run"), []);

    /// <summary>A coordinator and its stand-by (both with <paramref name="extra"/>) on one run directory; the coordinator SIGKILLs itself as step 21 starts.</summary>
    internal async Task StandbyTakesOver(string dir, string[] extra)
    {
        int primaryPort = LoopbackPorts.Next(), standbyPort = LoopbackPorts.Next();
        // No nodes yet: the coordinator waits for two, and they start only once the stand-by is up in its
        // cluster, so the stand-by is there before step 21, whatever the machine's speed.
        var primary = Start(dir, 2, ["--set", KillCoordinatorAs21Starts, .. extra], port: primaryPort, running: []);
        var up = new TaskCompletionSource();
        var standby = Start(dir, 2, ["--standby-for", Address(primaryPort), .. extra], (line, _) =>
        {
            if (line.StartsWith("stand-by coordinator is up", StringComparison.Ordinal)) up.TrySetResult();
        }, port: standbyPort, running: []);
        Process[] nodes = [];
        try
        {
            await up.Task.WaitAsync(TimeSpan.FromMinutes(1));
            nodes = [StartNode(Address(primaryPort), Address(standbyPort)), StartNode(Address(primaryPort), Address(standbyPort))];
            await primary.Coordinator.WaitForExitAsync().WaitAsync(TimeSpan.FromMinutes(3));
            await primary.Pump;
            output.WriteLine(primary.Text.ToString());
            Assert.Contains("fault injection: killing the coordinator's process", primary.Text.ToString());
            var text = await Finish(standby with { Nodes = nodes }, TimeSpan.FromMinutes(3));
            Assert.True(standby.Coordinator.ExitCode == 0, text);
            Assert.Contains("re-attached: 2 of 2 worker(s)", text);
            Assert.Equal(Enumerable.Range(1, 20), AssertStepsMatchReference(primary.Metrics));
            Assert.Equal(Enumerable.Range(21, Steps - 20), AssertStepsMatchReference(standby.Metrics));
        }
        finally
        {
            KillAll(primary with { Nodes = nodes });
            KillAll(standby);
        }
    }

    [Fact]
    public async Task A_stand_by_coordinator_ends_with_the_run_it_stood_by_for()
    {
        var dir = Path.Combine(TestSupport.TempDir(), "run");
        int primaryPort = LoopbackPorts.Next();
        var primary = Start(dir, 1, ["--set", "train.steps=5"], port: primaryPort, running: []);
        var up = new TaskCompletionSource();
        var standby = Start(dir, 1, ["--standby-for", Address(primaryPort), "--set", "train.steps=5"], (line, _) =>
        {
            if (line.StartsWith("stand-by coordinator is up", StringComparison.Ordinal)) up.TrySetResult();
        }, running: []);
        try
        {
            await up.Task.WaitAsync(TimeSpan.FromMinutes(1));
            var node = StartNode(Address(primaryPort));
            var first = await Finish(primary with { Nodes = [node] }, TimeSpan.FromMinutes(2));
            Assert.True(primary.Coordinator.ExitCode == 0, first);
            var text = await Finish(standby, TimeSpan.FromMinutes(1));
            Assert.True(standby.Coordinator.ExitCode == 0, text);
            Assert.Contains("has ended (training finished) at step 5; this stand-by coordinator has nothing to take over", text);
        }
        finally
        {
            KillAll(primary);
            KillAll(standby);
        }
    }

    [Fact]
    public async Task A_coordinator_killed_inside_an_update_leaves_units_at_two_steps_and_the_run_resumes_from_its_checkpoint()
    {
        var (firstMetrics, secondMetrics, text, _) = await KillCoordinatorAndStartAgain(
            "cluster.fault-injection=step=20,phase=update,worker=coordinator,action=kill");
        Assert.Contains("the nodes' units are at different steps (20, 21)", text);
        Assert.Contains("resuming from checkpoint", text);
        Assert.Equal(Enumerable.Range(1, 20), AssertStepsMatchReference(firstMetrics));
        var after = AssertStepsMatchReference(secondMetrics);
        Assert.True(after[0] is 11 or 21, $"resumed at step {after[0]}");
        Assert.Equal(Enumerable.Range(after[0], Steps - after[0] + 1), after);
    }

    [Fact]
    public async Task A_damaged_newest_checkpoint_is_named_and_the_run_resumes_from_the_one_before()
    {
        var dir = Path.Combine(TestSupport.TempDir(), "run");
        var committed = new TaskCompletionSource();
        var job = Start(dir, 2, [], (line, _) =>
        {
            if (line.StartsWith("checkpoint of step 30 committed", StringComparison.Ordinal)) committed.TrySetResult();
        });
        try { await committed.Task.WaitAsync(TimeSpan.FromMinutes(3)); }
        finally { KillAll(job); }
        await job.Pump;
        var newest = new CheckpointStore(dir).List().Last();
        var shard = Directory.GetFiles(Path.Combine(dir, newest.Directory), "*.safetensors").First();
        var bytes = File.ReadAllBytes(shard);
        bytes[^10] ^= 0x40;   // one bit of the last tensor
        File.WriteAllBytes(shard, bytes);

        var again = Start(dir, 2, []);
        var text = await Finish(again, TimeSpan.FromMinutes(3));
        Assert.True(again.Coordinator.ExitCode == 0, text);
        Assert.Contains(Path.GetFileName(shard), text);
        Assert.Contains("resuming from checkpoint step-000020", text);
        Assert.Equal(21, AssertStepsMatchReference(again.Metrics)[0]);
    }

    /// <summary>For <see cref="PostgresResumeTests"/>: kill after a checkpoint and resume on 2 nodes, the coordinator journaling to PostgreSQL.</summary>
    internal async Task RunPostgres(string runDir, string conf)
    {
        await TrainAndKillEverything(runDir, 2, ["--config", conf]);
        var job = Start(runDir, 2, ["--config", conf]);
        var text = await Finish(job, TimeSpan.FromMinutes(3));
        Assert.True(job.Coordinator.ExitCode == 0, text);
        Assert.Contains("resuming from checkpoint", text);
        Assert.True(AssertStepsMatchReference(job.Metrics)[0] is 21 or 31);
    }

    [Fact]
    public async Task A_run_directory_of_another_run_is_refused_naming_the_difference()
    {
        var dir = Path.Combine(TestSupport.TempDir(), "run");
        await TrainAndKillEverything(dir, 1);
        var job = Start(dir, 1, ["--set", "train.global-batch=24"]);
        var text = await Finish(job, TimeSpan.FromMinutes(2));
        Assert.NotEqual(0, job.Coordinator.ExitCode);
        Assert.Contains("holds another run", text);
        Assert.Contains("GlobalBatch: 24 vs 12", text);
    }
}

/// <summary>The resume of <see cref="ResumeTests"/> with the coordinator journal in a real PostgreSQL server.</summary>
[Collection(PostgresCollection.Name)]
public class PostgresResumeTests(PostgresServer server, ITestOutputHelper output)
{
    // What hocon/postgres.conf sets, with a new database of this server.
    private async Task<string> WriteConfig()
    {
        var database = await server.CreateDatabaseAsync();
        var conf = Path.Combine(TestSupport.TempDir(), "postgres.conf");
        File.WriteAllText(conf, $$"""
            akka.persistence {
              journal { plugin = "akka.persistence.journal.sql", sql { provider-name = "PostgreSQL.15", connection-string = "{{database}}" } }
              snapshot-store { plugin = "akka.persistence.snapshot-store.sql", sql { provider-name = "PostgreSQL.15", connection-string = "{{database}}" } }
            }
            """);
        return conf;
    }

    [PostgresFact]
    public async Task A_job_journaled_in_postgresql_resumes_on_two_nodes_with_the_same_curve()
    {
        var conf = await WriteConfig();
        var tests = new ResumeTests(output);
        var dir = Path.Combine(TestSupport.TempDir(), "run");
        await tests.RunPostgres(dir, conf);
        // The journal is in PostgreSQL, not in the run directory.
        Assert.False(File.Exists(Path.Combine(dir, "journal", "events.db")));
    }

    [PostgresFact]
    public async Task A_stand_by_coordinator_takes_a_run_journaled_in_postgresql_over()
    {
        var conf = await WriteConfig();
        var dir = Path.Combine(TestSupport.TempDir(), "run");
        await new ResumeTests(output).StandbyTakesOver(dir, ["--config", conf]);
        Assert.False(File.Exists(Path.Combine(dir, "journal", "events.db")));
    }
}
