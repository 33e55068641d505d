using System.Text.Json;
using ElasticMoE.Checkpointing;
using ElasticMoE.Cli;
using ElasticMoE.Data;
using ElasticMoE.Runtime.Hosting;
using ElasticMoE.Runtime.Protocol;

namespace ElasticMoE.Tests.Cluster;

// The shell's further read commands (train watch, experts heatmap, checkpoints verify, events, actors tree,
// diagnose) against a paused in-process cluster, and node-address completion.
public partial class ShellTests
{
    /// <summary>Every line of a --json command's output, parsed; the command must exit <paramref name="expected"/>.</summary>
    private static List<JsonElement> JsonLines(int port, int expected, string command, params string[] extra)
    {
        var (code, output, error) = Shell(port, ["--json", "-c", command, .. extra]);
        Assert.True(code == expected, $"'{command}' exited {code}, not {expected}: {output}{error}");
        return output.Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l => JsonDocument.Parse(l).RootElement.Clone()).ToList();
    }

    /// <summary>One command that must fail (exit 1) saying <paramref name="message"/>.</summary>
    private static void Fails(int port, string command, string message)
    {
        var (code, output, error) = Shell(port, "-c", command);
        Assert.True(code == 1, $"'{command}' exited {code}, not 1: {output}{error}");
        Assert.Contains(message, error);
    }

    [Fact]
    public async Task Shell_read_commands_heatmap_verify_events_actors_diagnose_and_watch_match_a_paused_run_with_a_run_directory()
    {
        var dir = TestSupport.TempDir();
        var cfg = Config(("shell.token", Token), ("checkpoint.every", "0")) with { RunDirectory = dir };
        await using var run = new Run(cfg, startSecond: false);
        await using var client = await PausedAfter(run, 2);
        var steps = run.Steps();
        long step = steps.Count;

        // A checkpoint of the paused step, so that there is one to verify and an event for it.
        Assert.True(Json(run.Port, "checkpoint now", "--token", Token).GetProperty("ok").GetBoolean());
        await WaitUntil(() => Json(run.Port, "checkpoints list").GetProperty("checkpoints").GetArrayLength() == 1, run);

        // experts heatmap: the mean tokens per step of each expert over the window (every step so far: fewer than 20).
        var heatmap = Json(run.Port, "experts heatmap");
        Assert.Equal(steps[^1].Step, heatmap.GetProperty("step").GetInt64());
        Assert.Equal(steps.Count, heatmap.GetProperty("windowSteps").GetInt32());
        Assert.Equal([1, 2], heatmap.GetProperty("layers").EnumerateArray().Select(l => l.GetInt32()).ToArray());
        var matrix = heatmap.GetProperty("loads").EnumerateArray().Select(r => r.EnumerateArray().Select(v => v.GetDouble()).ToArray()).ToArray();
        for (int o = 0; o < matrix.Length; o++)
        for (int e = 0; e < cfg.Model.MoE.RoutedExperts; e++)
            Assert.Equal(steps.Average(s => (double)s.ExpertCounts[o][e]), matrix[o][e], 9);
        var png = Path.Combine(dir, "heatmap.png");
        var (code, output, error) = Shell(run.Port, "-c", $"experts heatmap --png {png}");
        Assert.True(code == 0, output + error);
        Assert.Contains("max/mean", output);
        Assert.Contains($"wrote {png}", output);
        var bytes = File.ReadAllBytes(png);
        Assert.Equal(new byte[] { 0x89, (byte)'P', (byte)'N', (byte)'G' }, bytes[..4]);
        Assert.Equal(PlotCommand.DefaultWidth, System.Buffers.Binary.BinaryPrimitives.ReadInt32BigEndian(bytes.AsSpan(16)));
        Assert.Equal(PlotCommand.DefaultHeight, System.Buffers.Binary.BinaryPrimitives.ReadInt32BigEndian(bytes.AsSpan(20)));

        // events: the run's journal in order, with sequence numbers: nodes joined, the plan, the checkpoint.
        var events = Json(run.Port, "events").GetProperty("events").EnumerateArray().ToList();
        var seqs = events.Select(e => e.GetProperty("sequenceNr").GetInt64()).ToList();
        Assert.Equal(seqs.Order(), seqs);
        Assert.Equal(seqs.Count, seqs.Distinct().Count());
        var kinds = events.Select(e => e.GetProperty("kind").GetString()!).ToList();
        Assert.DoesNotContain("StepCommitted", kinds);
        Assert.Equal(2, kinds.Count(k => k == "NodeJoined"));
        int plan = kinds.IndexOf("PlanChanged"), checkpoint = kinds.IndexOf("CheckpointCommitted");
        Assert.True(kinds.LastIndexOf("NodeJoined") < plan && plan < checkpoint, string.Join(",", kinds));
        Assert.Equal(step, events[checkpoint].GetProperty("atStep").GetInt64());
        Assert.Contains($"checkpoint of step {step} committed", events[checkpoint].GetProperty("text").GetString());
        var since = Json(run.Port, $"events --since {step}").GetProperty("events").EnumerateArray().ToList();
        Assert.Equal(events.Where(e => e.GetProperty("atStep").GetInt64() >= step).Select(e => e.GetProperty("sequenceNr").GetInt64()),
            since.Select(e => e.GetProperty("sequenceNr").GetInt64()));
        Assert.Contains("CheckpointCommitted", since.Select(e => e.GetProperty("kind").GetString()));
        Assert.DoesNotContain("NodeJoined", since.Select(e => e.GetProperty("kind").GetString()));
        (code, output, _) = Shell(run.Port, "-c", "events");
        Assert.Equal(0, code);
        Assert.Contains("NodeJoined", output);
        Fails(run.Port, "events --since x", "--since expects a step number");

        // checkpoints verify: it verifies; a flipped byte in one of its files is named, exit 1; a wrong step is refused.
        var verified = Json(run.Port, "checkpoints verify");
        Assert.True(verified.GetProperty("ok").GetBoolean(), verified.ToString());
        Assert.Equal(step, Assert.Single(verified.GetProperty("checkpoints").EnumerateArray().ToList()).GetProperty("step").GetInt64());
        Assert.True(Json(run.Port, $"checkpoints verify {step}").GetProperty("ok").GetBoolean());
        var checkpointDir = Path.Combine(dir, CheckpointStore.DirectoryName(step));
        var victim = Directory.GetFiles(checkpointDir).Where(f => Path.GetFileName(f) != CheckpointManifest.FileName).Order(StringComparer.Ordinal).First();
        var content = File.ReadAllBytes(victim);
        content[content.Length / 2] ^= 0x01;
        File.WriteAllBytes(victim, content);
        (code, output, error) = Shell(run.Port, "-c", "checkpoints verify");
        Assert.Equal(1, code);
        Assert.Contains($"bad: step {step}: {CheckpointStore.DirectoryName(step)}/{Path.GetFileName(victim)}", output);
        Assert.Contains("1 checkpoint(s) do not verify", error);
        var bad = JsonLines(run.Port, 1, "checkpoints verify").Single();
        Assert.False(bad.GetProperty("ok").GetBoolean());
        Fails(run.Port, "checkpoints verify 999", "no committed checkpoint of step 999");
        Fails(run.Port, "checkpoints verify -3", "expects a step number");

        // actors tree: both nodes, the coordinator's singleton and shell endpoint on its node, a node agent on each.
        var coordinatorAddress = run.Coordinator.Address.ToString();
        var secondAddress = run.Second!.Address.ToString();
        var trees = Json(run.Port, "actors tree").GetProperty("nodes").EnumerateArray()
            .ToDictionary(n => n.GetProperty("node").GetString()!, n => n.GetProperty("actors").EnumerateArray().Select(a => a.GetProperty("path").GetString()!).ToList());
        Assert.Equal(new[] { coordinatorAddress, secondAddress }.Order(StringComparer.Ordinal), trees.Keys.Order(StringComparer.Ordinal));
        Assert.Contains("/user/coordinator/singleton", trees[coordinatorAddress]);
        Assert.Contains("/user/shell", trees[coordinatorAddress]);
        Assert.Contains("/user/node", trees[coordinatorAddress]);
        Assert.Contains("/user/node", trees[secondAddress]);
        Assert.DoesNotContain("/user/shell", trees[secondAddress]);
        var hostPort = $"{run.Second.Address.Host}:{run.Second.Address.Port}";
        var one = Assert.Single(Json(run.Port, $"actors tree /user/node --node {hostPort}").GetProperty("nodes").EnumerateArray().ToList());
        Assert.Equal(secondAddress, one.GetProperty("node").GetString());
        Assert.Equal("/user/node", one.GetProperty("actors")[0].GetProperty("path").GetString());
        (code, output, _) = Shell(run.Port, "-c", "actors tree");
        Assert.Equal(0, code);
        Assert.Contains("\n    coordinator  [ClusterSingletonManager]", output.Replace("\r", ""));
        Assert.Contains("singleton  [TrainingCoordinator]", output);
        Fails(run.Port, "actors tree --node 127.0.0.1:1", "no cluster member 127.0.0.1:1");
        Fails(run.Port, "actors tree user", "starts with '/'");

        // diagnose: both nodes up, reachable, registered with a data endpoint and planned: all pass, exit 0.
        var diagnosis = Json(run.Port, "diagnose");
        Assert.True(diagnosis.GetProperty("ok").GetBoolean(), diagnosis.ToString());
        Assert.Equal("paused", diagnosis.GetProperty("phase").GetString());
        var nodes = diagnosis.GetProperty("nodes").EnumerateArray().ToList();
        Assert.Equal(2, nodes.Count);
        Assert.All(nodes, n => Assert.Equal("pass", n.GetProperty("verdict").GetString()));
        Assert.All(nodes, n => Assert.Equal(1, n.GetProperty("planned").GetInt32()));
        (code, output, _) = Shell(run.Port, "-c", "diagnose");
        Assert.Equal(0, code);
        Assert.Contains("all pass", output);

        // train watch: bounded by time while paused (one line, the status does not change), then by steps once resumed.
        var watched = JsonLines(run.Port, 0, "train watch --seconds 1 --interval 0.2");
        Assert.Equal(step, Assert.Single(watched).GetProperty("step").GetInt64());
        Fails(run.Port, "train watch --steps 0", "--steps expects at least 1");
        Fails(run.Port, "train watch --frames 3", "unknown option '--frames'");
        Json(run.Port, "train resume", "--token", Token);
        watched = JsonLines(run.Port, 0, "train watch --steps 3 --interval 0.1");
        var first = watched[0].GetProperty("step").GetInt64();
        var last = watched[^1];
        Assert.True(last.GetProperty("step").GetInt64() >= first + 3 || last.GetProperty("phase").GetString() == "done", last.ToString());
        Assert.Equal(watched.Select(w => w.GetProperty("step").GetInt64()).Order(), watched.Select(w => w.GetProperty("step").GetInt64()));
        Json(run.Port, "train stop", "--token", Token);
        await run.Coordinator.Result.WaitAsync(Long);
    }

    [Fact]
    public async Task Shell_diagnose_fails_a_refused_worker_node_and_run_dir_commands_say_there_is_no_journal()
    {
        var cfg = Config(("shell.token", Token));
        await using var run = new Run(cfg, startSecond: false);
        await using var client = await PausedAfter(run, 1);
        // Without --run-dir: no journal, no checkpoints; said clearly, exit 1.
        Fails(run.Port, "events", "no journal: the run was started without --run-dir");
        Fails(run.Port, "checkpoints verify", "started without --run-dir");
        Assert.True(Json(run.Port, "diagnose").GetProperty("ok").GetBoolean());

        // A third worker node with another seed: a cluster member the run refused, so not in the run.
        var other = cfg with { Seed = cfg.Seed + 1 };
        await using var third = ClusterNode.Start(other, TextCorpus.Default(other.Data.ValidationFraction, other.Model.Context),
            coordinator: false, worker: true, join: run.Coordinator.Address);
        Assert.IsType<RunOutcome.Refused>(await third.Stopped.WaitAsync(Long));
        var diagnosis = JsonLines(run.Port, 1, "diagnose").Single();
        Assert.False(diagnosis.GetProperty("ok").GetBoolean());
        var nodes = diagnosis.GetProperty("nodes").EnumerateArray().ToDictionary(n => n.GetProperty("node").GetString()!);
        var refused = nodes[third.Address.ToString()];
        Assert.Equal("fail", refused.GetProperty("verdict").GetString());
        Assert.Equal(0, refused.GetProperty("workers").GetInt32());
        Assert.Contains(refused.GetProperty("reasons").EnumerateArray(), r => r.GetString()!.Contains("no worker registered with the run"));
        Assert.Equal("pass", nodes[run.Coordinator.Address.ToString()].GetProperty("verdict").GetString());
        Assert.Equal("pass", nodes[run.Second!.Address.ToString()].GetProperty("verdict").GetString());
        var (code, output, error) = Shell(run.Port, "-c", "diagnose");
        Assert.Equal(1, code);
        Assert.Contains("FAIL", output);
        Assert.Contains("not all pass", output);
        Assert.Contains("not every node passes", error);
        Json(run.Port, "train stop", "--token", Token);
        await run.Coordinator.Result.WaitAsync(Long);
    }

    [Fact]
    public void Shell_completion_completes_commands_and_node_addresses_after_node()
    {
        string[] commands = ["actors tree", "train status", "train watch"];
        string[] nodes = ["akka.tcp://elasticmoe@127.0.0.1:4001", "akka.tcp://elasticmoe@127.0.0.1:4002", "akka.tcp://elasticmoe@10.0.0.7:4001"];
        Assert.Equal(["train status", "train watch"], ShellCompleter.Candidates("train ", commands, nodes));
        Assert.Equal(["actors tree"], ShellCompleter.Candidates("act", commands, nodes));
        // After --node: the addresses that start with the word, in full or as HOST:PORT.
        Assert.Equal(["actors tree --node akka.tcp://elasticmoe@10.0.0.7:4001", "actors tree --node akka.tcp://elasticmoe@127.0.0.1:4001", "actors tree --node akka.tcp://elasticmoe@127.0.0.1:4002"],
            ShellCompleter.Candidates("actors tree --node ", commands, nodes));
        Assert.Equal(["actors tree /user --node 127.0.0.1:4001", "actors tree /user --node 127.0.0.1:4002"],
            ShellCompleter.Candidates("actors tree /user --node 127", commands, nodes));
        Assert.Equal(["actors tree --node 10.0.0.7:4001"], ShellCompleter.Candidates("actors tree --node 10.", commands, nodes));
        Assert.Empty(ShellCompleter.Candidates("actors tree --node 9", commands, nodes));
        // The argument of the node control commands is a node address too.
        Assert.Equal(["node leave 127.0.0.1:4001", "node leave 127.0.0.1:4002"], ShellCompleter.Candidates("node leave 127", commands, nodes));
        Assert.Equal(["fault kill-worker 10.0.0.7:4001"], ShellCompleter.Candidates("fault kill-worker 10", commands, nodes));
        Assert.Equal(["node down akka.tcp://elasticmoe@10.0.0.7:4001"], ShellCompleter.Candidates("node down akka.tcp://elasticmoe@10", commands, nodes));
    }
}
