using System.Diagnostics;
using System.Text.Json;
using ElasticMoE.Cli;
using ElasticMoE.Runtime.Hosting;

namespace ElasticMoE.Tests.Cluster;

/// <summary>
/// `elasticmoe shell -c ... --json` against a cluster of OS processes (`train` plus two `node` processes), as an
/// operator runs it: the read commands checked against what the processes are, with the run held at a known step
/// boundary (paused before its first step), then resumed to its end.
/// </summary>
[Collection("cluster")]
public class ShellProcessTests
{
    private const string Token = "t0k-procs";

    private static (int Code, string Out, string Err) Shell(int port, params string[] args) => Shell(port, 30, args);

    private static (int Code, string Out, string Err) Shell(int port, double timeout, params string[] args)
    {
        var stdout = new StringWriter();
        var stderr = new StringWriter();
        int code = Program.Run(["shell", "--connect", $"127.0.0.1:{port}", "--timeout", timeout.ToString(System.Globalization.CultureInfo.InvariantCulture), .. args], stdout, stderr);
        return (code, stdout.ToString(), stderr.ToString());
    }

    private static JsonElement Json(int port, string command, params string[] extra)
    {
        var (code, output, error) = Shell(port, ["--json", "-c", command, .. extra]);
        Assert.True(code == 0, $"'{command}' exited {code}: {output}{error}");
        return JsonDocument.Parse(output.Split('\n', StringSplitOptions.RemoveEmptyEntries).Single()).RootElement.Clone();
    }

    private static async Task Until(Func<bool> condition, string what)
    {
        var deadline = Stopwatch.StartNew();
        while (!condition())
        {
            Assert.True(deadline.Elapsed < TimeSpan.FromSeconds(90), $"timed out waiting for {what}");
            await Task.Delay(200);
        }
    }

    [Fact]
    public async Task Shell_read_commands_describe_a_cluster_of_node_processes()
    {
        TestSupport.EnsureTorch();
        var settings = TestSupport.SmallSettings(("train.steps", "6"), ("train.eval-every", "1000"), ("cluster.pipeline-stages", "1"));
        var args = TestSupport.SetArguments(settings).Concat(["--threads", "1"]).ToArray();
        int port = LoopbackPorts.Next();
        var procs = new List<Process>();
        var coordinator = NodeProcesses.Start(["train", "--nodes", "0", "--expect-nodes", "2", "--port", port.ToString(), "--set", $"shell.token={Token}", .. args]);
        procs.Add(coordinator);
        try
        {
            // Paused before any node exists, so the run holds before its first step once the nodes are planned.
            await Until(() => Shell(port, 2, "-c", "train pause", "--token", Token).Code == 0, "the coordinator's shell endpoint");
            var seed = $"akka.tcp://elasticmoe@127.0.0.1:{port}";
            for (int i = 0; i < 2; i++) procs.Add(NodeProcesses.Start(["node", "--seed-node", seed, .. args]));
            await Until(() => Json(port, "train status").GetProperty("phase").GetString() == "paused"
                              && Json(port, "plan").GetProperty("epoch").GetInt32() == 1, "the run to hold after its first plan");

            // cluster show: the coordinator's process and both node processes, all up and reachable in the end.
            JsonElement cluster = default;
            await Until(() =>
            {
                cluster = Json(port, "cluster show");
                return cluster.GetProperty("members").GetArrayLength() == 3
                       && cluster.GetProperty("members").EnumerateArray().All(m => m.GetProperty("status").GetString() == "Up");
            }, "three members up");
            var members = cluster.GetProperty("members").EnumerateArray().ToList();
            Assert.All(members, m => Assert.True(m.GetProperty("reachable").GetBoolean()));
            var coordinatorMember = Assert.Single(members, m => m.GetProperty("coordinator").GetBoolean());
            Assert.Equal(seed, coordinatorMember.GetProperty("address").GetString());
            var nodeAddresses = members.Select(m => m.GetProperty("address").GetString()!).Where(a => a != seed).Order(StringComparer.Ordinal).ToList();

            // workers and plan: one worker per node process, DP 2, ranks on those processes.
            var workers = Json(port, "workers").GetProperty("workers").EnumerateArray().ToList();
            Assert.Equal(nodeAddresses, workers.Select(w => w.GetProperty("node").GetString()!).Order(StringComparer.Ordinal));
            Assert.Equal([0, 1], workers.Select(w => w.GetProperty("rank").GetInt32()).Order());
            var plan = Json(port, "plan");
            Assert.Equal(2, plan.GetProperty("dp").GetInt32());
            Assert.Equal(2, plan.GetProperty("worldSize").GetInt32());
            Assert.Equal(0L, Json(port, "train status").GetProperty("step").GetInt64());

            // actors tree of a node process: its agent and its device worker live there.
            var tree = Shell(port, "-c", $"actors tree --node {nodeAddresses[0]}");
            Assert.True(tree.Code == 0, tree.Out + tree.Err);
            Assert.StartsWith(nodeAddresses[0], tree.Out);
            Assert.Contains("node  [NodeAgent]", tree.Out);
            Assert.Contains("worker-0  [DeviceWorker]", tree.Out);
            Assert.DoesNotContain("TrainingCoordinator", tree.Out);

            // diagnose: every node passes; exit code 0.
            var diagnosis = Json(port, "diagnose");
            Assert.True(diagnosis.GetProperty("ok").GetBoolean(), diagnosis.ToString());
            Assert.Equal(3, diagnosis.GetProperty("nodes").GetArrayLength());

            // The same as a process, as scripts run it.
            var p = NodeProcesses.Start("shell", "--connect", $"127.0.0.1:{port}", "--timeout", "30", "--json", "-c", "workers; train status");
            var (exit, text) = await NodeProcesses.Finish(p, TimeSpan.FromSeconds(60));
            Assert.True(exit == 0, text);
            Assert.Equal(2, text.Split('\n', StringSplitOptions.RemoveEmptyEntries).Length);

            Assert.Equal(0, Shell(port, "-c", "train resume", "--token", Token).Code);
            var (code, output) = await NodeProcesses.Finish(coordinator, TimeSpan.FromSeconds(120));
            Assert.True(code == 0, output);
            Assert.Contains("done: 6 steps", output);
        }
        finally
        {
            foreach (var proc in procs)
                if (!proc.HasExited) proc.Kill(entireProcessTree: true);
        }
    }
}
