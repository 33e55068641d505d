using System.Diagnostics;
using System.Text;
using System.Text.Json;
using ElasticMoE.Data;
using ElasticMoE.Runtime.Actors;
using ElasticMoE.Runtime.Hosting;
using ElasticMoE.Runtime.Journal;
using ElasticMoE.Runtime.Protocol;
using ElasticMoE.Tests.Journal;
using ElasticMoE.Training;
using Xunit.Abstractions;
using static ElasticMoE.Tests.Cluster.ShellTests;

namespace ElasticMoE.Tests.Cluster;

/// <summary>
/// The shell's control commands with arguments: relayout, node leave, node down, fault kill-worker. Each is
/// issued while the run is held at a step boundary (train pause), so the boundary it lands on is known; the
/// run then goes on and its curve must be that of the same run without the command. Refusals (no token, a
/// wrong one, an impossible request) exit 1 with the reason and change nothing.
/// </summary>
[Collection("cluster")]
public class ShellControlTests(ITestOutputHelper output)
{
    private static (int Code, string Err) Refused(int port, params string[] args)
    {
        var (code, _, error) = Shell(port, args);
        return (code, error);
    }

    private static void AssertRefused(int port, string because, params string[] args)
    {
        var (code, error) = Refused(port, args);
        Assert.True(code == 1, $"'{string.Join(' ', args)}' exited {code}: {error}");
        Assert.Contains(because, error);
    }

    private static async Task<List<StepResult>> NeverCommanded(ElasticMoE.Configuration.ElasticMoEConfig cfg)
    {
        using var quiet = new TrainingReport(TextWriter.Null, null);
        var plain = cfg with { RunDirectory = null, Cluster = cfg.Cluster with { Nodes = 2 } };
        return (await LocalCluster.RunAsync(plain, TextCorpus.Default(cfg.Data.ValidationFraction, cfg.Model.Context), quiet).WaitAsync(Long)).Steps.ToList();
    }

    private static string HostPort(Akka.Actor.Address a) => $"{a.Host}:{a.Port}";

    [Fact]
    public async Task Shell_relayout_re_plans_at_the_paused_boundary_refuses_impossible_layouts_and_every_accepted_command_is_journaled()
    {
        var dir = TestSupport.TempDir();
        var cfg = Config(("shell.token", Token), ("checkpoint.every", "0"), ("train.steps", "16"), ("train.eval-every", "8")) with { RunDirectory = dir };
        await using (var run = new Run(cfg, startSecond: false))
        {
            await using var client = await PausedAfter(run, 4);
            long step = run.Steps().Count;
            var plan = Json(run.Port, "plan");
            Assert.Equal((1, 1, 2), (plan.GetProperty("epoch").GetInt32(), plan.GetProperty("dp").GetInt32(), plan.GetProperty("pp").GetInt32()));

            // Refused, exit 1, nothing changes: no token, a wrong one, layouts the planner cannot make, bad arguments.
            AssertRefused(run.Port, "control commands need the shell token", "-c", "relayout 2x1");
            AssertRefused(run.Port, "wrong shell token", "--token", "nope", "-c", "relayout 2x1");
            AssertRefused(run.Port, "wrong shell token", "-c", "relayout 2x1 --token nope");
            AssertRefused(run.Port, "cannot re-lay out to 3x1: asked for 3 workers but only 2 are available", "--token", Token, "-c", "relayout 3x1");
            AssertRefused(run.Port, "pp 3 must divide workers 2", "--token", Token, "-c", "relayout 2x3");
            AssertRefused(run.Port, "already laid out as 2x2", "--token", Token, "-c", "relayout 2x2");
            AssertRefused(run.Port, "usage: relayout WORKERSxPP", "--token", Token, "-c", "relayout two");
            AssertRefused(run.Port, "missing a layout", "--token", Token, "-c", "relayout");
            plan = Json(run.Port, "plan");
            Assert.Equal(1, plan.GetProperty("epoch").GetInt32());
            Assert.Equal("paused", Json(run.Port, "train status").GetProperty("phase").GetString());
            Assert.Equal(step, run.Steps().Count);

            // Accepted: re-planned at this boundary (the run is held there), as DP 2 x PP 1, and held again.
            var ack = Json(run.Port, "relayout 2x1", "--token", Token);
            Assert.True(ack.GetProperty("ok").GetBoolean());
            await WaitPaused(client);
            plan = Json(run.Port, "plan");
            Assert.Equal((2, 2, 1, 2), (plan.GetProperty("epoch").GetInt32(), plan.GetProperty("dp").GetInt32(), plan.GetProperty("pp").GetInt32(),
                plan.GetProperty("worldSize").GetInt32()));
            Assert.Equal(step, plan.GetProperty("atStep").GetInt64());
            Assert.Equal(step, run.Steps().Count);

            Json(run.Port, "train resume", "--token", Token);
            var result = await run.Coordinator.Result.WaitAsync(Long);
            Assert.Equal(2, result.Plans.Count);
            Assert.Equal(step, result.Plans[1].AtStep);
            Assert.Equal(0, result.RedoneAttempts);
            SingleProcessReference.AssertStepsMatch("re-laid out from the shell vs never", result.Steps, await NeverCommanded(cfg));
        }

        // The journal holds every accepted control command, in order, at the step it was accepted before;
        // none of the refused ones.
        var system = JournalTestKit.NewSystem(JournalConfig.Sqlite(dir));
        try
        {
            var state = (await JournalTestKit.Recovered(system, TrainingCoordinator.JournalId)).State;
            var commands = state.ShellCommands.Select(c => string.Join(' ', [c.Command, .. c.Args])).ToArray();
            Assert.Equal(["pause", "resume", "pause", "relayout 2 1", "resume"], commands);
            Assert.Equal(0, state.ShellCommands[0].Step);
            var relayout = state.ShellCommands[3];
            Assert.Equal(state.ShellCommands[4].Step, relayout.Step);
            Assert.Equal(16, state.NextStep);
        }
        finally { await system.Terminate(); }
    }

    [Fact]
    public async Task Shell_node_down_recovers_without_the_node_at_the_paused_boundary_and_refused_node_commands_change_nothing()
    {
        var cfg = Config(("shell.token", Token), ("cluster.pipeline-stages", "1"), ("train.steps", "16"), ("train.eval-every", "8"));
        await using var run = new Run(cfg, startSecond: false);
        await using var client = await PausedAfter(run, 4);
        long step = run.Steps().Count;
        var second = HostPort(run.Second!.Address);
        var coordinator = HostPort(run.Coordinator.Address);

        // Refused, exit 1, nothing changes.
        foreach (var verb in new[] { "node leave", "node down", "fault kill-worker" })
        {
            AssertRefused(run.Port, "control commands need the shell token", "-c", $"{verb} {second}");
            AssertRefused(run.Port, "wrong shell token", "--token", "nope", "-c", $"{verb} {second}");
            AssertRefused(run.Port, "no node of the run has address '127.0.0.1:1'", "--token", Token, "-c", $"{verb} 127.0.0.1:1");
            AssertRefused(run.Port, "hosts the coordinator", "--token", Token, "-c", $"{verb} akka.tcp://elasticmoe@{coordinator}");
            AssertRefused(run.Port, "missing a node address", "--token", Token, "-c", verb);
        }
        AssertRefused(run.Port, "runs in the coordinator's own process", "--token", Token, "-c", $"fault kill-worker {second}");
        var plan = Json(run.Port, "plan");
        Assert.Equal((1, 2), (plan.GetProperty("epoch").GetInt32(), plan.GetProperty("worldSize").GetInt32()));
        Assert.Equal(2, Json(run.Port, "workers").GetProperty("workers").GetArrayLength());
        Assert.Equal(step, run.Steps().Count);

        // Accepted: the node is downed at this boundary; its units come back from their mirrors on the node that stays.
        Assert.True(Json(run.Port, $"node down {second}", "--token", Token).GetProperty("ok").GetBoolean());
        await WaitPaused(client);
        plan = Json(run.Port, "plan");
        Assert.Equal((2, 1), (plan.GetProperty("epoch").GetInt32(), plan.GetProperty("worldSize").GetInt32()));
        Assert.Equal(step, plan.GetProperty("atStep").GetInt64());
        // Once downed, the address is no node of the run any more.
        AssertRefused(run.Port, "no node of the run has address", "--token", Token, "-c", $"node down {second}");

        Json(run.Port, "train resume", "--token", Token);
        var result = await run.Coordinator.Result.WaitAsync(Long);
        Assert.Equal(2, result.Plans.Count);
        Assert.Equal(0, result.RedoneAttempts);
        Assert.Contains("was downed from the shell", run.Console.Text);
        SingleProcessReference.AssertStepsMatch("a node downed from the shell vs never", result.Steps, await NeverCommanded(cfg));
    }

    [Fact]
    public async Task Shell_node_down_sent_while_a_step_runs_waits_for_the_next_boundary_and_no_step_is_redone()
    {
        // Not paused: the command reaches the coordinator while the step after step 4 is in flight (it is
        // sent as step 4 is reported, and the coordinator has started the next one by then).
        var cfg = Config(("shell.token", Token), ("cluster.pipeline-stages", "1"), ("train.steps", "16"), ("train.eval-every", "8"));
        await using var run = new Run(cfg, startSecond: false);
        var client = await ShellClient.ConnectAsync($"127.0.0.1:{run.Port}", TimeSpan.FromSeconds(30));
        await using (client)
        {
            Task<IElasticMoEMessage>? down = null;
            run.OnStep = r =>
            {
                if (r.Step == 3) down = client.AskAsync(new ShellControlCommand("node-down", [HostPort(run.Second!.Address)], Token));
            };
            run.StartSecond();
            var result = await run.Coordinator.Result.WaitAsync(Long);
            var ack = Ack(await down!);
            Assert.True(ack.Ok, ack.Message);
            Assert.Contains("is downed at the next step boundary", ack.Message);
            // Carried out once, between two steps: one more plan, on the node that stays, and no attempt redone.
            Assert.Equal(2, result.Plans.Count);
            Assert.Equal(1, result.Plans[1].Dp * result.Plans[1].Pp);
            Assert.InRange(result.Plans[1].AtStep, 5, 15);
            Assert.Equal(0, result.RedoneAttempts);
            SingleProcessReference.AssertStepsMatch("a node downed mid-step from the shell vs never", result.Steps, await NeverCommanded(cfg));
        }
    }

    [Fact]
    public async Task Shell_commands_sent_back_to_back_while_a_re_plan_installs_are_each_carried_out_once()
    {
        // `relayout` re-plans at the paused boundary; `node down`, sent right after it, finds that re-plan being
        // installed (then it waits for the boundary after it) or done (then it is carried out at once): either
        // way each is carried out exactly once, at the same step, and the run holds again after both.
        var cfg = Config(("shell.token", Token), ("train.steps", "16"), ("train.eval-every", "8"));
        await using var run = new Run(cfg, startSecond: false);
        await using var client = await PausedAfter(run, 4);
        long step = run.Steps().Count;
        var (code, text, error) = Shell(run.Port, "--token", Token, "-c", $"relayout 2x1; node down {HostPort(run.Second!.Address)}");
        Assert.True(code == 0, text + error);
        await WaitPaused(client);
        var plan = Json(run.Port, "plan");
        Assert.Equal((3, 1, 1), (plan.GetProperty("epoch").GetInt32(), plan.GetProperty("worldSize").GetInt32(), plan.GetProperty("pp").GetInt32()));
        Json(run.Port, "train resume", "--token", Token);
        var result = await run.Coordinator.Result.WaitAsync(Long);
        Assert.Equal([(1, 2), (2, 1), (1, 1)], result.Plans.Select(p => (p.Dp, p.Pp)).ToArray());
        Assert.All(result.Plans.Skip(1), p => Assert.Equal(step, p.AtStep));
        Assert.Equal(0, result.RedoneAttempts);
        SingleProcessReference.AssertStepsMatch("re-laid out and a node downed vs neither", result.Steps, await NeverCommanded(cfg));
    }

    // ---- node processes --------------------------------------------------------------------------

    private const int ProcessSteps = 20;

    private static Dictionary<string, string> ProcessSettings() => TestSupport.SmallSettings(
        ("seed", "1"), ("model.layers", "4"), ("model.dense-layers", "1"), ("model.moe.routed-experts", "6"),
        ("train.global-batch", "12"), ("train.micro-batch", "2"), ("train.steps", ProcessSteps.ToString()), ("train.eval-every", "10"),
        ("train.eval-batches", "2"), ("cluster.checksum-every", "5"), ("cluster.pipeline-stages", "1"), ("shell.token", Token));

    /// <summary>A coordinator process (no worker of its own) and two node processes, each node's address read off its first line.</summary>
    private sealed class Processes : IAsyncDisposable
    {
        private readonly StringBuilder _text = new();
        private readonly Task _pump;

        public Process Coordinator { get; }
        public (Process Process, string Address)[] Nodes { get; }
        public string Metrics { get; }
        public int Port { get; }
        public string Text { get { lock (_text) return _text.ToString(); } }

        private Processes(Process coordinator, (Process, string)[] nodes, string metrics, int port)
        {
            Coordinator = coordinator;
            Nodes = nodes;
            Metrics = metrics;
            Port = port;
            _pump = Task.Run(async () =>
            {
                string? line;
                while ((line = await coordinator.StandardOutput.ReadLineAsync()) is not null)
                    lock (_text) _text.AppendLine(line);
            });
        }

        public static async Task<Processes> Start()
        {
            string[] args = [.. TestSupport.SetArguments(ProcessSettings()), "--threads", "1"];
            TestSupport.EnsureTorch();
            int port = LoopbackPorts.Next();
            var metrics = Path.Combine(TestSupport.TempDir(), "metrics.jsonl");
            var coordinator = NodeProcesses.Start(["train", "--nodes", "0", "--expect-nodes", "2", "--port", port.ToString(), "--metrics", metrics, .. args]);
            var seed = $"akka.tcp://elasticmoe@127.0.0.1:{port}";
            var nodes = new List<(Process, string)>();
            foreach (var p in Enumerable.Range(0, 2).Select(_ => NodeProcesses.Start(["node", "--seed-node", seed, .. args])))
            {
                // "node akka.tcp://elasticmoe@127.0.0.1:PORT joining ..."
                var first = await p.StandardOutput.ReadLineAsync().WaitAsync(TimeSpan.FromMinutes(1)) ?? "";
                nodes.Add((p, first.Split(' ')[1]));
            }
            return new Processes(coordinator, nodes.ToArray(), metrics, port);
        }

        public async Task<(int Code, string Text)> Finish()
        {
            using var cts = new CancellationTokenSource(TimeSpan.FromMinutes(2));
            await Coordinator.WaitForExitAsync(cts.Token);
            await _pump;
            return (Coordinator.ExitCode, Text + await Coordinator.StandardError.ReadToEndAsync());
        }

        public async ValueTask DisposeAsync()
        {
            foreach (var p in Nodes.Select(n => n.Process).Append(Coordinator))
                if (!p.HasExited) p.Kill(entireProcessTree: true);
            await Task.CompletedTask;
        }
    }

    /// <summary>
    /// Held before step 1 (paused before the nodes are up), then let go for a step or two and held again:
    /// which boundary it holds at is the machine's pace, and nothing checked depends on it.
    /// </summary>
    private static async Task<ShellClient> HoldAfterAFewSteps(Processes run)
    {
        var client = await ShellClient.ConnectAsync($"127.0.0.1:{run.Port}", TimeSpan.FromSeconds(60));
        await PauseOnceStarted(client, () => run.Text);
        var deadline = DateTime.UtcNow + Long;
        while (Assert.IsType<ShellPlan>(await client.AskAsync(new ShellPlanQuery())).Epoch == 0 || await Phase(client) != "paused")
        {
            Assert.True(DateTime.UtcNow < deadline, "the run never held before step 1:\n" + run.Text);
            await Task.Delay(50);
        }
        Assert.True(Ack(await client.AskAsync(new ShellControl("resume", Token))).Ok);
        Assert.True(Ack(await client.AskAsync(new ShellControl("pause", Token))).Ok);
        await WaitPaused(client);
        return client;
    }

    private static async Task<string> Phase(ShellClient client) => Assert.IsType<ShellTrainStatus>(await client.AskAsync(new ShellTrainStatusQuery())).Phase;

    private static async Task<ShellPlan> WaitForWorldSize(ShellClient client, int workers, Processes run)
    {
        var deadline = DateTime.UtcNow + Long;
        ShellPlan plan;
        while ((plan = Assert.IsType<ShellPlan>(await client.AskAsync(new ShellPlanQuery()))).WorldSize != workers || await Phase(client) != "paused")
        {
            Assert.True(DateTime.UtcNow < deadline, $"the plan never came to {workers} worker(s):\n" + run.Text);
            await Task.Delay(50);
        }
        return plan;
    }

    private static readonly Lazy<IReadOnlyList<StepResult>> ProcessReference = new(() => SingleProcessReference.Train(
        TestSupport.SmallConfig(ProcessSettings().Select(kv => (kv.Key, kv.Value)).ToArray()), ProcessSteps).Steps);

    /// <summary>
    /// Resumes the held run and waits for its end: exit 0, every step the single-process loop's, one membership
    /// event of kind <paramref name="membershipEvent"/>, and the node that stayed ends cleanly. Returns the coordinator's output.
    /// </summary>
    private async Task<string> ResumeToTheEnd(Processes run, ShellClient client, string membershipEvent)
    {
        var reference = ProcessReference.Value;
        Assert.True(Ack(await client.AskAsync(new ShellControl("resume", Token))).Ok);
        var (exit, all) = await run.Finish();
        output.WriteLine(all);
        Assert.True(exit == 0, all);
        SingleProcessReference.AssertMetricsMatch(run.Metrics, reference);
        var change = Assert.Single(File.ReadAllLines(run.Metrics).Select(l => JsonDocument.Parse(l).RootElement), l => l.TryGetProperty("event", out _));
        Assert.Equal(membershipEvent, change.GetProperty("event").GetString());
        var (survivorCode, survivorText) = await NodeProcesses.Finish(run.Nodes[0].Process, Long);
        Assert.True(survivorCode == 0, survivorText);
        return all;
    }

    [Fact]
    public async Task Shell_node_leave_hands_a_node_process_units_over_and_the_run_goes_on_without_it()
    {
        await using var run = await Processes.Start();
        await using var client = await HoldAfterAFewSteps(run);
        var (leaver, address) = run.Nodes[1];
        Assert.Equal(2, Assert.IsType<ShellPlan>(await client.AskAsync(new ShellPlanQuery())).WorldSize);

        // The address as host:port; the CLI's exit code and message.
        var hostPort = address["akka.tcp://elasticmoe@".Length..];
        var (code, text, error) = Shell(run.Port, "--token", Token, "-c", $"node leave {hostPort}");
        Assert.True(code == 0, text + error);
        Assert.Contains("hands its units over", text);
        var plan = await WaitForWorldSize(client, 1, run);
        Assert.Equal(2, plan.Epoch);
        Assert.DoesNotContain(plan.Ranks, r => r.StartsWith(address + "#", StringComparison.Ordinal));
        var (leaverCode, leaverText) = await NodeProcesses.Finish(leaver, Long);
        output.WriteLine(leaverText);
        Assert.True(leaverCode == 7, $"exit {leaverCode}: {leaverText}");   // ExitCodes.RunStopped: it left on request
        Assert.Contains("asked to leave from the shell (node leave); its units were handed over", leaverText);
        AssertRefused(run.Port, "no node of the run has address", "--token", Token, "-c", $"node leave {hostPort}");

        var all = await ResumeToTheEnd(run, client, "node-left");
        Assert.Contains("asked to leave from the shell", all);
    }

    [Fact]
    public async Task Shell_fault_kill_worker_SIGKILLs_a_node_process_and_the_run_recovers_with_the_same_curve()
    {
        await using var run = await Processes.Start();
        await using var client = await HoldAfterAFewSteps(run);
        var (victim, address) = run.Nodes[1];

        AssertRefused(run.Port, "wrong shell token", "--token", "nope", "-c", $"fault kill-worker {address}");
        Assert.False(victim.HasExited);
        var (code, text, error) = Shell(run.Port, "--token", Token, "-c", $"fault kill-worker {address}");
        Assert.True(code == 0, text + error);
        var plan = await WaitForWorldSize(client, 1, run);
        Assert.Equal(2, plan.Epoch);
        var (victimCode, victimText) = await NodeProcesses.Finish(victim, Long);
        output.WriteLine(victimText);
        Assert.Equal(137, victimCode);   // SIGKILL
        Assert.Contains("fault kill-worker from the shell: killing this node's process (SIGKILL)", victimText);

        // The recovery is counted as a lost node's.
        await ResumeToTheEnd(run, client, "node-lost");
    }

    [Fact]
    public async Task Shell_fault_kill_worker_sent_while_steps_run_kills_the_node_at_the_next_boundary_and_the_run_recovers()
    {
        await using var run = await Processes.Start();
        await using var client = await HoldAfterAFewSteps(run);
        var (victim, address) = run.Nodes[1];
        // Resumed first: the kill arrives while a step runs (many are left), so it waits for the next boundary;
        // the node dies under the step that follows it, which is recovered as from any SIGKILL.
        Assert.True(Ack(await client.AskAsync(new ShellControl("resume", Token))).Ok);
        var ack = Ack(await client.AskAsync(new ShellControlCommand("fault-kill-worker", [address], Token)));
        Assert.True(ack.Ok, ack.Message);
        Assert.Contains("at the next step boundary", ack.Message);
        var (exit, all) = await run.Finish();
        output.WriteLine(all);
        Assert.True(exit == 0, all);
        Assert.Equal(137, (await NodeProcesses.Finish(victim, Long)).Code);
        SingleProcessReference.AssertMetricsMatch(run.Metrics, ProcessReference.Value);
        Assert.Contains(File.ReadAllLines(run.Metrics), l => l.Contains("\"event\":\"node-lost\"", StringComparison.Ordinal));
        Assert.True((await NodeProcesses.Finish(run.Nodes[0].Process, Long)).Code == 0);
    }
}
