using System.Text.Json;
using ElasticMoE.Cli;
using ElasticMoE.Configuration;
using ElasticMoE.Data;
using ElasticMoE.Runtime.Hosting;
using ElasticMoE.Runtime.Protocol;
using ElasticMoE.Training;

namespace ElasticMoE.Tests.Cluster;

/// <summary>
/// `elasticmoe shell` against an in-process cluster (the CLI's own code, in this process) and as a process:
/// every read command's --json checked against the run's known state, the control commands, bad input.
/// The run is paused at a known point (a step boundary) before anything is read, so nothing races.
/// </summary>
[Collection("cluster")]
public partial class ShellTests
{
    internal const string Token = "t0k-shell";
    internal static readonly TimeSpan Long = TimeSpan.FromSeconds(90);

    /// <summary>A cluster: a coordinator node with a worker, and (once started) a second worker node; steps as reported.</summary>
    internal sealed class Run : IAsyncDisposable
    {
        private readonly TextCorpus _corpus;

        public ElasticMoEConfig Config { get; }
        public ConsoleCapture Console { get; } = new();
        public TrainingReport Report { get; }
        public List<StepResult> Reported { get; } = new();
        public ClusterNode Coordinator { get; }
        public ClusterNode? Second { get; private set; }
        public int Port => Coordinator.Address.Port!.Value;

        /// <summary>Called on each reported step (on the coordinator's thread: must not block).</summary>
        public Action<StepResult>? OnStep { get; set; }

        public Run(ElasticMoEConfig config, bool startSecond = true)
        {
            Config = config;
            Report = new TrainingReport(Console, null);
            Report.StepReported += r =>
            {
                lock (Reported) Reported.Add(r);
                OnStep?.Invoke(r);
            };
            _corpus = TextCorpus.Default(config.Data.ValidationFraction, config.Model.Context);
            Coordinator = ClusterNode.Start(config, _corpus, coordinator: true, worker: true, report: Report);
            if (startSecond) StartSecond();
        }

        /// <summary>The second node: the run needs both (cluster.expected-nodes = 2) before its first step.</summary>
        public void StartSecond() => Second = ClusterNode.Start(Config, _corpus, coordinator: false, worker: true, join: Coordinator.Address);

        public List<StepResult> Steps()
        {
            lock (Reported) return Reported.ToList();
        }

        public async ValueTask DisposeAsync()
        {
            if (Second is not null) await Second.DisposeAsync();
            await Coordinator.DisposeAsync();
            Report.Dispose();
        }
    }

    /// <summary>
    /// Pauses a run whose coordinator may not have started yet: the endpoint is up before the coordinator singleton
    /// (which starts once its node is Up) and until then answers that the run has not started, so the pause is asked again.
    /// </summary>
    internal static async Task PauseOnceStarted(ShellClient client, Func<string> said)
    {
        var deadline = DateTime.UtcNow + Long;
        IElasticMoEMessage reply;
        while ((reply = await client.AskAsync(new ShellControl("pause", Token))) is ShellError e)
        {
            Assert.True(DateTime.UtcNow < deadline, $"the coordinator never answered: {e.Message}\n{said()}");
            await Task.Delay(50);
        }
        Assert.True(Ack(reply).Ok);
    }

    /// <summary>
    /// A run held at a known step boundary, with no race: paused before its second node exists (so before
    /// step 1), resumed with a pause sent as step <paramref name="afterStep"/> is reported, then waited for
    /// until the coordinator says it holds. Returns the shell client that did it (connected to the run).
    /// </summary>
    internal static async Task<ShellClient> PausedAfter(Run run, long afterStep)
    {
        var client = await ShellClient.ConnectAsync($"127.0.0.1:{run.Port}", TimeSpan.FromSeconds(30));
        await PauseOnceStarted(client, () => run.Console.Text);
        run.StartSecond();
        await WaitPaused(client);
        Assert.Empty(run.Steps());
        run.OnStep = r =>
        {
            if (r.Step == afterStep) _ = client.AskAsync(new ShellControl("pause", Token));
        };
        Assert.True(Ack(await client.AskAsync(new ShellControl("resume", Token))).Ok);
        await WaitUntil(() => run.Steps().Count > afterStep, run);
        await WaitPaused(client);
        return client;
    }

    internal static ShellAck Ack(IElasticMoEMessage reply) => Assert.IsType<ShellAck>(reply);

    internal static async Task WaitPaused(ShellClient client)
    {
        var deadline = DateTime.UtcNow + Long;
        while (Assert.IsType<ShellTrainStatus>(await client.AskAsync(new ShellTrainStatusQuery())).Phase != "paused")
        {
            Assert.True(DateTime.UtcNow < deadline, "the run never held at a step boundary");
            await Task.Delay(50);
        }
    }

    internal static async Task WaitUntil(Func<bool> condition, Run run)
    {
        var deadline = DateTime.UtcNow + Long;
        while (!condition())
        {
            Assert.True(DateTime.UtcNow < deadline, "timed out; the run said:\n" + run.Console.Text);
            await Task.Delay(50);
        }
    }

    internal static ElasticMoEConfig Config(params (string, string)[] extra) => TestSupport.SmallConfig(
    [
        ("cluster.nodes", "0"), ("cluster.expected-nodes", "2"), ("cluster.pipeline-stages", "2"),
        ("train.steps", "60"), ("train.eval-every", "20"), .. extra,
    ]);

    internal static (int Code, string Out, string Err) Shell(int port, params string[] args)
    {
        var stdout = new StringWriter();
        var stderr = new StringWriter();
        int code = Program.Run(["shell", "--connect", $"127.0.0.1:{port}", "--timeout", "30", .. args], stdout, stderr);
        return (code, stdout.ToString(), stderr.ToString());
    }

    /// <summary>One command with --json: it must succeed and print one JSON object.</summary>
    internal static JsonElement Json(int port, string command, params string[] extra)
    {
        var (code, output, error) = Shell(port, ["--json", "-c", command, .. extra]);
        Assert.True(code == 0, $"'{command}' exited {code}: {output}{error}");
        var lines = output.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        return JsonDocument.Parse(Assert.Single(lines)).RootElement.Clone();
    }

    [Fact]
    public async Task Shell_read_commands_match_the_paused_run_and_resume_continues_the_same_curve()
    {
        var cfg = Config(("shell.token", Token));
        await using var run = new Run(cfg, startSecond: false);
        await using var client = await PausedAfter(run, 2);
        var steps = run.Steps();
        Assert.InRange(steps.Count, 3, 59);

        // train status: the step count, the last loss and validation, paused.
        var status = Json(run.Port, "train status");
        Assert.Equal(steps.Count, status.GetProperty("step").GetInt64());
        Assert.Equal(60, status.GetProperty("stepsTotal").GetInt64());
        Assert.Equal(steps[^1].Loss, status.GetProperty("loss").GetDouble());
        Assert.Equal("paused", status.GetProperty("phase").GetString());
        Assert.True(status.GetProperty("paused").GetBoolean());
        Assert.Equal(0, status.GetProperty("redoneAttempts").GetInt32());
        Assert.Equal(1, status.GetProperty("plans").GetInt32());
        Assert.Equal(2, status.GetProperty("workers").GetInt32());

        // cluster show: both members up and reachable, with their roles; the coordinator's node hosts it.
        // A node registers (and trains) as soon as it joins, so the leader may not have moved it to Up by
        // the time the run is paused: ask again until it has (Akka's membership, not ours, sets the pace).
        var cluster = Json(run.Port, "cluster show");
        for (var wait = System.Diagnostics.Stopwatch.StartNew();
             cluster.GetProperty("members").EnumerateArray().Any(m => m.GetProperty("status").GetString() != "Up") && wait.Elapsed < TimeSpan.FromSeconds(30);
             cluster = Json(run.Port, "cluster show"))
            await Task.Delay(100);
        var coordinatorAddress = run.Coordinator.Address.ToString();
        var secondAddress = run.Second!.Address.ToString();
        Assert.Equal(coordinatorAddress, cluster.GetProperty("self").GetString());
        var members = cluster.GetProperty("members").EnumerateArray().ToDictionary(m => m.GetProperty("address").GetString()!);
        Assert.Equal(new[] { coordinatorAddress, secondAddress }.Order(StringComparer.Ordinal), members.Keys.Order(StringComparer.Ordinal));
        Assert.All(members.Values, m => Assert.Equal("Up", m.GetProperty("status").GetString()));
        Assert.All(members.Values, m => Assert.True(m.GetProperty("reachable").GetBoolean()));
        Assert.Equal(new[] { "coordinator", "worker" }, members[coordinatorAddress].GetProperty("roles").EnumerateArray().Select(r => r.GetString()!).ToArray());
        Assert.Equal(new[] { "worker" }, members[secondAddress].GetProperty("roles").EnumerateArray().Select(r => r.GetString()!).ToArray());
        Assert.True(members[coordinatorAddress].GetProperty("coordinator").GetBoolean());
        Assert.False(members[secondAddress].GetProperty("coordinator").GetBoolean());

        // plan: DP 1 x PP 2 over the 3 blocks, both MoE layers' experts placed on ranks 0..1.
        var plan = Json(run.Port, "plan");
        Assert.Equal(1, plan.GetProperty("epoch").GetInt32());
        Assert.Equal(1, plan.GetProperty("dp").GetInt32());
        Assert.Equal(2, plan.GetProperty("pp").GetInt32());
        Assert.Equal(2, plan.GetProperty("worldSize").GetInt32());
        var stages = plan.GetProperty("stages").EnumerateArray().ToList();
        Assert.Equal(0, stages[0].GetProperty("first").GetInt32());
        Assert.Equal(stages[0].GetProperty("end").GetInt32(), stages[1].GetProperty("first").GetInt32());
        Assert.Equal(cfg.Model.Layers, stages[1].GetProperty("end").GetInt32());
        var experts = plan.GetProperty("experts").EnumerateArray().ToList();
        Assert.Equal([1, 2], experts.Select(e => e.GetProperty("layer").GetInt32()).ToArray());
        Assert.All(experts, e => Assert.Equal(cfg.Model.MoE.RoutedExperts, e.GetProperty("owner").GetArrayLength()));

        // workers: one per node, ranks 0 and 1 on stages 0 and 1, what the plan says.
        var workers = Json(run.Port, "workers").GetProperty("workers").EnumerateArray().ToList();
        Assert.Equal(2, workers.Count);
        Assert.Equal([0, 1], workers.Select(w => w.GetProperty("rank").GetInt32()).ToArray());
        Assert.Equal([0, 1], workers.Select(w => w.GetProperty("stage").GetInt32()).ToArray());
        var ranks = plan.GetProperty("ranks").EnumerateArray().Select(r => r.GetString()!).ToList();
        for (int r = 0; r < 2; r++) Assert.StartsWith(workers[r].GetProperty("node").GetString()! + "#", ranks[r]);
        Assert.Equal(new[] { coordinatorAddress, secondAddress }.Order(), workers.Select(w => w.GetProperty("node").GetString()!).Order());
        // Each worker's own figures, from its last step computed (the one before the pause): compute time, memory, threads.
        Assert.All(workers, w =>
        {
            Assert.Equal(steps[^1].Step, w.GetProperty("statsStep").GetInt64());
            Assert.InRange(w.GetProperty("computeSeconds").GetDouble(), 1e-6, 60);
            Assert.InRange(w.GetProperty("workingSetBytes").GetInt64(), 1L << 20, long.MaxValue);
            Assert.Equal(TorchSharp.torch.get_num_threads(), w.GetProperty("threads").GetInt32());
        });
        var workersText = Shell(run.Port, "-c", "workers");
        Assert.Contains("compute s", workersText.Out);
        Assert.Contains("memory MiB", workersText.Out);

        // experts loads: the last committed step's counts, per MoE layer and for one layer.
        var loads = Json(run.Port, "experts loads");
        Assert.Equal(steps[^1].Step, loads.GetProperty("step").GetInt64());
        var layers = loads.GetProperty("layers").EnumerateArray().ToList();
        Assert.Equal(steps[^1].ExpertCounts.Length, layers.Count);
        for (int o = 0; o < layers.Count; o++)
            Assert.Equal(steps[^1].ExpertCounts[o], layers[o].GetProperty("tokens").EnumerateArray().Select(t => t.GetInt64()).ToArray());
        var one = Json(run.Port, "experts loads --layer 2").GetProperty("layers");
        Assert.Equal(2, Assert.Single(one.EnumerateArray().ToList()).GetProperty("layer").GetInt32());

        // checkpoints list: a run without --run-dir has none.
        var checkpoints = Json(run.Port, "checkpoints list");
        Assert.Equal(0, checkpoints.GetProperty("checkpoints").GetArrayLength());

        // Control without the token, or with a wrong one: refused, exit 1, and the run stays paused where it was.
        var (code, output, error) = Shell(run.Port, "--json", "-c", "train resume");
        Assert.Equal(1, code);
        Assert.Contains("control commands need the shell token", error);
        Assert.Contains("\"error\"", output);
        (code, _, error) = Shell(run.Port, "--token", "wrong", "-c", "train resume");
        Assert.Equal(1, code);
        Assert.Contains("wrong shell token", error);
        (code, _, error) = Shell(run.Port, "-c", $"train stop --token nope");
        Assert.Equal(1, code);
        Assert.Contains("wrong shell token", error);
        status = Json(run.Port, "train status");
        Assert.Equal("paused", status.GetProperty("phase").GetString());
        Assert.Equal(steps.Count, status.GetProperty("step").GetInt64());
        Assert.Equal(steps.Count, run.Steps().Count);
        Assert.False(run.Coordinator.Result.IsCompleted);

        // Resume: the run goes on to its end, with the curve of a run never paused.
        var resumed = Json(run.Port, "train resume", "--token", Token);
        Assert.True(resumed.GetProperty("ok").GetBoolean());
        var result = await run.Coordinator.Result.WaitAsync(Long);
        Assert.Null(result.StoppedBy);
        // The reference: the same run on the same layout, never paused (a cluster run is deterministic).
        using var quiet = new TrainingReport(TextWriter.Null, null);
        var reference = await LocalCluster.RunAsync(cfg with { Cluster = cfg.Cluster with { Nodes = 2 } },
            TextCorpus.Default(cfg.Data.ValidationFraction, cfg.Model.Context), quiet).WaitAsync(Long);
        Assert.Equal(60, reference.Steps.Count);
        Assert.Equal(reference.Steps.Select(r => (r.Loss, r.GradNorm)), result.Steps.Select(r => (r.Loss, r.GradNorm)));
        Assert.Equal(reference.Validation, result.Validation);
    }

    [Fact]
    public async Task Shell_control_commands_are_refused_when_the_coordinator_has_no_token()
    {
        // Token from the coordinator's environment variable would make this test depend on the machine's.
        Assert.True(string.IsNullOrEmpty(Environment.GetEnvironmentVariable(ShellCommand.TokenVariable)));
        var cfg = Config(("train.steps", "100000"));
        await using var run = new Run(cfg);
        await run.Console.WaitFor("step     2/", Long);
        // No token configured on the coordinator: every control command is refused, whatever the shell sends.
        var (code, _, error) = Shell(run.Port, "--token", Token, "-c", "train pause");
        Assert.Equal(1, code);
        Assert.Contains("control commands are disabled", error);
        Assert.False(Json(run.Port, "train status").GetProperty("paused").GetBoolean());
        // Not paused: the run keeps stepping.
        int before = run.Steps().Count;
        await WaitUntil(() => run.Steps().Count > before + 2, run);
        Assert.False(run.Coordinator.Result.IsCompleted);
    }

    [Fact]
    public async Task Shell_train_stop_ends_the_run_after_the_step_in_flight()
    {
        var cfg = Config(("train.steps", "100000"), ("shell.token", Token));
        await using var run = new Run(cfg);
        await run.Console.WaitFor("step     2/", Long);
        var stop = Json(run.Port, "train stop", "--token", Token);
        Assert.True(stop.GetProperty("ok").GetBoolean());
        var result = await run.Coordinator.Result.WaitAsync(Long);
        Assert.Equal("stopped from the shell", result.StoppedBy);
        Assert.InRange(result.Steps.Count, 2, 99_999);
        Assert.Equal(result.Steps.Count, run.Steps().Count);
    }

    [Fact]
    public async Task Shell_checkpoint_now_commits_a_checkpoint_of_the_paused_step()
    {
        var dir = TestSupport.TempDir();
        var cfg = Config(("shell.token", Token), ("checkpoint.every", "0")) with { RunDirectory = dir };
        await using var run = new Run(cfg, startSecond: false);
        await using var client = await PausedAfter(run, 2);
        long step = run.Steps().Count;
        var ack = Json(run.Port, "checkpoint now", "--token", Token);
        Assert.True(ack.GetProperty("ok").GetBoolean());
        var deadline = DateTime.UtcNow + Long;
        JsonElement listed;
        while ((listed = Json(run.Port, "checkpoints list").GetProperty("checkpoints")).GetArrayLength() == 0)
        {
            Assert.True(DateTime.UtcNow < deadline, "the checkpoint was never committed:\n" + run.Console.Text);
            await Task.Delay(200);
        }
        var checkpoint = Assert.Single(listed.EnumerateArray().ToList());
        Assert.Equal(step, checkpoint.GetProperty("step").GetInt64());
        Assert.True(checkpoint.GetProperty("files").GetInt32() > 0);
        Assert.Equal(64, checkpoint.GetProperty("manifestSha256").GetString()!.Length);
        Json(run.Port, "train stop", "--token", Token);
        var result = await run.Coordinator.Result.WaitAsync(Long);
        Assert.Equal(step, result.Steps.Count);
    }

    [Fact]
    public async Task Shell_rebalance_now_predicts_with_a_dry_run_and_re_places_experts_at_the_boundary_without_changing_the_curve()
    {
        // PP 1 (rebalancing places experts over every worker) and no bias updates, so the loads stay skewed.
        var cfg = Config(("shell.token", Token), ("cluster.pipeline-stages", "1"), ("model.moe.bias-update-rate", "0"),
            ("seed", "1"), ("model.layers", "4"), ("model.moe.routed-experts", "6"), ("train.global-batch", "12"),
            ("train.steps", "16"), ("train.eval-every", "1000"));
        await using var run = new Run(cfg, startSecond: false);
        await using var client = await PausedAfter(run, 5);

        // A dry run needs no token and changes nothing; asked twice, it predicts the same (nothing moved).
        var preview = Json(run.Port, "rebalance now --dry-run");
        Assert.True(preview.GetProperty("possible").GetBoolean(), preview.ToString());
        double before = preview.GetProperty("maxOverMeanBefore").GetDouble(), after = preview.GetProperty("maxOverMeanAfter").GetDouble();
        int copies = preview.GetProperty("copiesMoved").GetInt32();
        Assert.True(after <= before, preview.ToString());
        Assert.True(copies > 0, "this seed and config keep the loads skewed enough to move a copy: " + preview);
        Assert.Equal(preview.ToString(), Json(run.Port, "rebalance now --dry-run").ToString());
        Assert.Equal(1, Json(run.Port, "plan").GetProperty("epoch").GetInt32());

        // The real one needs the token; with it, it is carried out at this boundary (the run is paused here).
        var (code, _, error) = Shell(run.Port, "-c", "rebalance now");
        Assert.Equal(1, code);
        Assert.Contains("control commands need the shell token", error);
        Assert.True(Json(run.Port, "rebalance now", "--token", Token).GetProperty("ok").GetBoolean());
        await WaitPaused(client);
        Assert.Equal(copies > 0 ? 2 : 1, Json(run.Port, "plan").GetProperty("epoch").GetInt32());

        Json(run.Port, "train resume", "--token", Token);
        var result = await run.Coordinator.Result.WaitAsync(Long);
        Assert.Equal(copies > 0 ? 2 : 1, result.Plans.Count);
        // The same run never rebalanced: the curve does not notice the move (copies split rows, sum gradients).
        using var quiet = new TrainingReport(TextWriter.Null, null);
        var reference = await LocalCluster.RunAsync(cfg with { Cluster = cfg.Cluster with { Nodes = 2 } },
            TextCorpus.Default(cfg.Data.ValidationFraction, cfg.Model.Context), quiet).WaitAsync(Long);
        SingleProcessReference.AssertStepsMatch("rebalanced from the shell vs never rebalanced", result.Steps, reference.Steps.ToList());
    }

    [Fact]
    public async Task Shell_rebalance_requested_while_a_step_is_aborted_and_redone_happens_once_at_the_next_boundary()
    {
        // Step 7 (index 6) fails in its backward on rank 1 and is redone; the request arrives as that step starts.
        var cfg = Config(("shell.token", Token), ("cluster.pipeline-stages", "1"), ("model.moe.bias-update-rate", "0"),
            ("seed", "1"), ("model.layers", "4"), ("model.moe.routed-experts", "6"), ("train.global-batch", "12"),
            ("train.steps", "12"), ("train.eval-every", "1000"), ("cluster.fault-injection", "step=6,phase=backward,worker=1"));
        await using var run = new Run(cfg, startSecond: false);
        var client = await ShellClient.ConnectAsync($"127.0.0.1:{run.Port}", TimeSpan.FromSeconds(30));
        await using (client)
        {
            Task<IElasticMoEMessage>? request = null;
            run.OnStep = r =>
            {
                if (r.Step == 5) request = client.AskAsync(new ShellControl("rebalance", Token));
            };
            run.StartSecond();
            var result = await run.Coordinator.Result.WaitAsync(Long);
            Assert.True(Ack(await request!).Ok);
            Assert.True(result.RedoneAttempts >= 1, "the injected fault made step 7 be redone");
            // Deferred to the boundary after the aborted step, not lost, and carried out once: one re-plan.
            Assert.Equal(2, result.Plans.Count);
            Assert.Equal(7, result.Plans[1].AtStep);
            Assert.Contains("rebalance requested from the shell", run.Console.Text);
            using var quiet = new TrainingReport(TextWriter.Null, null);
            var plain = cfg with { Cluster = cfg.Cluster with { Nodes = 2, FaultInjection = "" } };
            var reference = await LocalCluster.RunAsync(plain, TextCorpus.Default(cfg.Data.ValidationFraction, cfg.Model.Context), quiet).WaitAsync(Long);
            SingleProcessReference.AssertStepsMatch("rebalanced after a redo vs neither", result.Steps, reference.Steps.ToList());
        }
    }

    [Fact]
    public async Task Shell_unknown_commands_and_wrong_arguments_fail_with_a_suggestion_and_change_nothing()
    {
        var cfg = Config(("train.steps", "100000"), ("shell.token", Token));
        await using var run = new Run(cfg);
        await run.Console.WaitFor("step     2/", Long);
        var (code, output, error) = Shell(run.Port, "-c", "trian status");
        Assert.Equal(1, code);
        Assert.Contains("unknown command 'trian status'; did you mean 'train status'?", error);
        (code, _, error) = Shell(run.Port, "-c", "cluster shwo");
        Assert.Equal(1, code);
        Assert.Contains("did you mean 'cluster show'?", error);
        (code, _, error) = Shell(run.Port, "-c", "experts loads --layer x");
        Assert.Equal(1, code);
        Assert.Contains("--layer expects a block number", error);
        (code, _, error) = Shell(run.Port, "-c", "plan extra");
        Assert.Equal(1, code);
        Assert.Contains("unexpected argument 'extra'", error);
        // One bad command among good ones: the good ones still run and print, the exit code says one failed.
        (code, output, _) = Shell(run.Port, "--json", "-c", "train status; nonsense; plan");
        Assert.Equal(1, code);
        var lines = output.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.Equal(3, lines.Length);
        Assert.Contains("\"error\"", lines[1]);
        Assert.Equal(1, JsonDocument.Parse(lines[2]).RootElement.GetProperty("epoch").GetInt32());
        Assert.False(run.Coordinator.Result.IsCompleted);
        Assert.False(Json(run.Port, "train status").GetProperty("paused").GetBoolean());
    }

    [Fact]
    public async Task Shell_with_an_unreachable_address_or_a_bad_command_line_exits_2()
    {
        int port = LoopbackPorts.Next();
        var stderr = new StringWriter();
        Assert.Equal(2, Program.Run(["shell", "--connect", $"127.0.0.1:{port}", "--timeout", "5", "-c", "cluster show"], new StringWriter(), stderr));
        Assert.Contains($"no ElasticMoE coordinator answered at 127.0.0.1:{port}", stderr.ToString());
        Assert.Equal(2, Program.Run(["shell", "-c", "plan"], new StringWriter(), stderr));
        Assert.Contains("needs --connect HOST:PORT", stderr.ToString());
        Assert.Equal(2, Program.Run(["shell", "--connect", "nohost", "-c", "plan"], new StringWriter(), stderr));
        Assert.Contains("--connect expects HOST:PORT", stderr.ToString());
        Assert.Equal(2, Program.Run(["shell", "--connect", "127.0.0.1:1", "--frobnicate"], new StringWriter(), stderr));
        // The same as a process, as scripts run it.
        var p = NodeProcesses.Start("shell", "--connect", $"127.0.0.1:{port}", "--timeout", "5", "--json", "-c", "train status");
        var (exit, text) = await NodeProcesses.Finish(p, TimeSpan.FromSeconds(60));
        Assert.Equal(2, exit);
        Assert.Contains("no ElasticMoE coordinator answered", text);
    }

    [Fact]
    public async Task Shell_repl_in_a_pseudo_terminal_completes_runs_suggests_and_exits()
    {
        // util-linux `script` gives the shell a terminal (so its line editor runs, not plain piped lines).
        Assert.True(File.Exists("/usr/bin/script"), "this test needs util-linux script(1) for a pseudo-terminal");
        var cfg = Config(("train.steps", "100000"));
        await using var run = new Run(cfg);
        await run.Console.WaitFor("step     2/", Long);
        var psi = new System.Diagnostics.ProcessStartInfo("/usr/bin/script")
        {
            RedirectStandardInput = true, RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false,
        };
        foreach (var a in new[] { "-qfc", $"dotnet {Path.Combine(AppContext.BaseDirectory, "elasticmoe.dll")} shell --connect 127.0.0.1:{run.Port}", "/dev/null" })
            psi.ArgumentList.Add(a);
        using var p = System.Diagnostics.Process.Start(psi)!;
        var output = new System.Text.StringBuilder();
        p.OutputDataReceived += (_, e) => { lock (output) output.AppendLine(e.Data); };
        p.BeginOutputReadLine();
        p.BeginErrorReadLine();
        string Text() { lock (output) return output.ToString(); }
        try
        {
            // "clus" + TAB completes to the one command it starts ("cluster show "), which then runs.
            p.StandardInput.Write("clus\t\n");
            p.StandardInput.Flush();
            await WaitUntil(() => Text().Contains("coordinator,worker"), run);
            Assert.Contains("elasticmoe> cluster show", Text());
            p.StandardInput.Write("wokers\n");
            p.StandardInput.Flush();
            await WaitUntil(() => Text().Contains("did you mean 'workers'?"), run);
            p.StandardInput.Write("exit\n");
            p.StandardInput.Flush();
            using var cts = new CancellationTokenSource(Long);
            await p.WaitForExitAsync(cts.Token);
            Assert.Equal(0, p.ExitCode);
        }
        finally
        {
            if (!p.HasExited) p.Kill(entireProcessTree: true);
        }
        Assert.False(run.Coordinator.Result.IsCompleted);
    }
}
