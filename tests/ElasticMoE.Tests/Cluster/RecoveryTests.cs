using System.Diagnostics;
using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;
using ElasticMoE.Training;
using Xunit.Abstractions;
using ElasticMoE.Runtime.Hosting;

namespace ElasticMoE.Tests.Cluster;

/// <summary>
/// Kill and continue with real node processes: a node dies by SIGKILL (from outside, or by its own hand in a
/// chosen phase), the survivors go on without restarting, and every committed step still equals the
/// fault-free single-process loop.
/// </summary>
[Collection("cluster")]
public class RecoveryTests(ITestOutputHelper output)
{
    private static Dictionary<string, string> Settings(int steps, int pp = 1, int batch = 12) => TestSupport.SmallSettings(
        ("seed", "1"), ("model.layers", "4"), ("model.dense-layers", "1"), ("model.moe.routed-experts", "6"),
        ("train.global-batch", batch.ToString()), ("train.micro-batch", "2"), ("train.steps", steps.ToString()), ("train.eval-every", "10"),
        ("train.eval-batches", "2"), ("cluster.checksum-every", "5"), ("cluster.pipeline-stages", pp.ToString()));

    private static readonly Dictionary<(int, int), IReadOnlyList<StepResult>> References = new();

    private static IReadOnlyList<StepResult> Reference(int steps, int batch = 12)
    {
        lock (References)
        {
            if (!References.TryGetValue((steps, batch), out var r))
                References[(steps, batch)] = r = SingleProcessReference.Train(
                    TestSupport.SmallConfig(Settings(steps, batch: batch).Select(kv => (kv.Key, kv.Value)).ToArray()), steps).Steps;
            return r;
        }
    }

    private sealed record Outcome(int Code, string Text, string Metrics, Process[] Nodes)
    {
        public List<JsonElement> Events => File.ReadAllLines(Metrics).Select(l => JsonDocument.Parse(l).RootElement)
            .Where(l => l.TryGetProperty("event", out _)).ToList();

        public int Redone => int.Parse(Regex.Match(Text, @"(\d+) step attempt\(s\) redone").Groups[1].Value);
    }

    /// <summary>
    /// Coordinator + <paramref name="nodes"/> node processes; <paramref name="onLine"/> sees each coordinator stdout
    /// line with the nodes so far and a function that starts one more.
    /// </summary>
    /// <param name="expectNodes">What the coordinator waits for (default <paramref name="nodes"/>), when <paramref name="startNodes"/> starts them.</param>
    /// <param name="startNodes">Starts nodes with arguments of their own (e.g. ports), after the <paramref name="nodes"/> plain ones.</param>
    /// <param name="coordinatorExtra">Arguments for the coordinator alone (e.g. <c>--run-dir</c>).</param>
    private async Task<Outcome> Run(int nodes, Dictionary<string, string> settings, string[] extra, Action<string, IReadOnlyList<Process>, Func<string[], Process>>? onLine = null,
        int? coordinatorPort = null, Func<Task>? beforeNodes = null, int? expectNodes = null, Action<Func<string[], Process>>? startNodes = null,
        string[]? coordinatorExtra = null, Func<int, string[]>? nodeArgs = null)
    {
        TestSupport.EnsureTorch();
        var args = TestSupport.SetArguments(settings).Concat(["--threads", "1"]).ToArray();
        int port = coordinatorPort ?? LoopbackPorts.Next();
        var metrics = Path.Combine(TestSupport.TempDir(), "metrics.jsonl");
        var coordinator = NodeProcesses.Start(["train", "--nodes", "0", "--expect-nodes", (expectNodes ?? nodes).ToString(), "--port", port.ToString(), "--metrics", metrics, .. args, .. extra, .. coordinatorExtra ?? []]);
        var seed = $"akka.tcp://elasticmoe@127.0.0.1:{port}";
        var procs = new List<Process>();
        Process AddNode(params string[] more)
        {
            var p = NodeProcesses.Start(["node", "--seed-node", seed, .. args, .. extra, .. more]);
            procs.Add(p);
            return p;
        }
        var text = new StringBuilder();
        try
        {
            // Inside the try: a failure here must not leave the coordinator's process running.
            if (beforeNodes is not null) await beforeNodes();
            for (int i = 0; i < nodes; i++) AddNode(nodeArgs?.Invoke(i) ?? []);
            startNodes?.Invoke(AddNode);
            var stderr = coordinator.StandardError.ReadToEndAsync();
            string? line;
            using var cts = new CancellationTokenSource(TimeSpan.FromMinutes(3));
            while ((line = await coordinator.StandardOutput.ReadLineAsync(cts.Token)) is not null)
            {
                text.AppendLine(line);
                onLine?.Invoke(line, procs, AddNode);
            }
            await coordinator.WaitForExitAsync(cts.Token);
            text.AppendLine(await stderr);
            output.WriteLine(text.ToString());
            return new Outcome(coordinator.ExitCode, text.ToString(), metrics, procs.ToArray());
        }
        catch
        {
            output.WriteLine(text.ToString());
            throw;
        }
        finally
        {
            foreach (var p in procs.Append(coordinator))
                if (!p.HasExited) p.Kill(entireProcessTree: true);
        }
    }

    private static async Task AssertSurvivorsFinishCleanly(IEnumerable<Process> survivors)
    {
        // The same processes that started the run (never restarted: their PIDs are the ones we launched)
        // end it, told by the coordinator that training finished.
        foreach (var p in survivors)
        {
            var (code, text) = await NodeProcesses.Finish(p, TimeSpan.FromSeconds(60));
            Assert.True(code == 0, $"node {p.Id}: exit {code}\n{text}");
        }
    }

    [Fact]
    public async Task A_node_SIGKILLed_at_step_20_of_60_leaves_the_survivors_to_finish_with_the_same_curve()
    {
        const int steps = 60;
        var reference = Reference(steps);
        Process? victim = null;
        var r = await Run(3, Settings(steps), ["--set", "cluster.join-settle=0"], (line, nodes, _) =>
        {
            if (victim is null && line.StartsWith("step    20/", StringComparison.Ordinal))
            {
                victim = nodes[1];
                victim.Kill();   // SIGKILL
            }
        });
        Assert.True(r.Code == 0, r.Text);
        Assert.NotNull(victim);
        SingleProcessReference.AssertMetricsMatch(r.Metrics, reference);
        var lost = Assert.Single(r.Events);
        Assert.Equal("node-lost", lost.GetProperty("event").GetString());
        Assert.InRange(lost.GetProperty("step").GetInt32(), 21, 22);
        Assert.True(lost.GetProperty("recovery_s").GetDouble() < 10, r.Text);
        Assert.InRange(r.Redone, 0, 1);
        Assert.Contains("2 worker(s), DP 2 x PP 1", r.Text);
        await AssertSurvivorsFinishCleanly(r.Nodes.Where(n => n != victim));
    }

    [Fact]
    public async Task Redundancy_2_two_of_five_node_processes_SIGKILLed_at_once_lose_nothing_and_keep_the_curve()
    {
        const int steps = 40;
        var reference = Reference(steps);
        Process[]? victims = null;
        var r = await Run(5, Settings(steps), ["--set", "cluster.join-settle=0", "--set", "cluster.redundancy=2"], (line, nodes, _) =>
        {
            if (victims is null && line.StartsWith("step    20/", StringComparison.Ordinal))
            {
                // Two nodes next to each other in start order: with one mirror they would often hold a unit and its mirror.
                victims = [nodes[1], nodes[2]];
                foreach (var v in victims) v.Kill();   // SIGKILL, both at the same instant
            }
        });
        Assert.True(r.Code == 0, r.Text);
        Assert.NotNull(victims);
        SingleProcessReference.AssertMetricsMatch(r.Metrics, reference);
        Assert.Equal(["node-lost", "node-lost"], r.Events.Select(e => e.GetProperty("event").GetString()));
        Assert.InRange(r.Redone, 0, 2);
        Assert.Contains("2 mirror(s) per unit", r.Text);
        Assert.Contains("3 worker(s), DP 3 x PP 1", r.Text);
        Assert.DoesNotContain("no holder left", r.Text);
        await AssertSurvivorsFinishCleanly(r.Nodes.Where(n => !victims.Contains(n)));
    }

    [Fact]
    public async Task Two_failure_domains_of_two_node_processes_one_mirror_a_whole_domain_SIGKILLed_loses_nothing()
    {
        const int steps = 40;
        var reference = Reference(steps);
        Process[]? victims = null;
        // Nodes 0 and 1 in rack-a, 2 and 3 in rack-b: their ranks follow their (random) ports, so without domains
        // a buddy would often be in its own rack.
        var r = await Run(4, Settings(steps), ["--set", "cluster.join-settle=0", "--set", "cluster.redundancy=1"], (line, nodes, _) =>
        {
            if (victims is null && line.StartsWith("step    20/", StringComparison.Ordinal))
            {
                victims = [nodes[0], nodes[1]];
                foreach (var v in victims) v.Kill();   // the whole of rack-a, at the same instant
            }
        }, nodeArgs: i => ["--set", $"cluster.failure-domain=rack-{(i < 2 ? 'a' : 'b')}"]);
        Assert.True(r.Code == 0, r.Text);
        Assert.NotNull(victims);
        SingleProcessReference.AssertMetricsMatch(r.Metrics, reference);
        Assert.Contains("across 2 failure domain(s)", r.Text);
        Assert.Contains("2 worker(s), DP 2 x PP 1", r.Text);
        Assert.Equal(["node-lost", "node-lost"], r.Events.Select(e => e.GetProperty("event").GetString()));
        await AssertSurvivorsFinishCleanly(r.Nodes.Where(n => !victims.Contains(n)));
    }

    [Fact]
    public async Task Nodes_that_join_at_steps_15_and_30_are_planned_in_and_the_curve_is_unchanged()
    {
        // A node process takes a few seconds to start (tens of steps on a loaded box), so the run is long enough for both
        // to be planned in mid-run: the first is started when step 15 is printed, the second at step 30 or, if the first
        // is not planned in by then, once it is (else both could arrive together and share one plan).
        const int steps = 150;
        bool firstPlanned = false, secondStarted = false;
        var r = await Run(1, Settings(steps), ["--set", "cluster.join-settle=0"], (line, _, addNode) =>
        {
            if (line.StartsWith("step    15/", StringComparison.Ordinal)) addNode([]);
            if (line.StartsWith("node-joined ", StringComparison.Ordinal)) firstPlanned = true;
            if (!secondStarted && firstPlanned && Regex.Match(line, @"^step +(\d+)/") is { Success: true } m && int.Parse(m.Groups[1].Value) >= 30)
            {
                secondStarted = true;
                addNode([]);
            }
        });
        Assert.True(secondStarted, "the first node was never planned in");
        Assert.True(r.Code == 0, r.Text);
        SingleProcessReference.AssertMetricsMatch(r.Metrics, Reference(steps));
        Assert.Equal(["node-joined", "node-joined"], r.Events.Select(e => e.GetProperty("event").GetString()));
        Assert.Contains("2 worker(s), DP 2 x PP 1", r.Text);
        Assert.Contains("3 worker(s), DP 3 x PP 1", r.Text);
        Assert.Equal(0, r.Redone);
        Assert.Equal(3, r.Nodes.Count(n => n.WaitForExit(TimeSpan.FromSeconds(60)) && n.ExitCode == 0));
    }

    [Fact]
    public async Task A_node_joining_a_run_below_its_redundancy_is_planned_in_without_the_settle_window()
    {
        // One node with redundancy 1: every unit has its only copy there (a window of risk). A node that joins is planned
        // in at the next step boundary, not after cluster.join-settle (60 s here, far beyond the whole run).
        const int steps = 80;
        var r = await Run(1, Settings(steps), ["--set", "cluster.join-settle=60", "--set", "cluster.redundancy=1"], (line, nodes, addNode) =>
        {
            if (nodes.Count == 1 && line.StartsWith("step     5/", StringComparison.Ordinal)) addNode([]);
        });
        Assert.True(r.Code == 0, r.Text);
        SingleProcessReference.AssertMetricsMatch(r.Metrics, Reference(steps));
        Assert.Contains("the run is below its redundancy: node", r.Text);
        var joined = Assert.Single(r.Events);
        Assert.Equal("node-joined", joined.GetProperty("event").GetString());
        Assert.True(joined.GetProperty("recovery_s").GetDouble() < 30, joined.ToString());   // no 60 s window
        Assert.Contains("2 worker(s), DP 2 x PP 1", r.Text);
    }

    [Fact]
    public async Task A_node_with_another_run_config_is_refused_mid_run_and_the_run_goes_on()
    {
        // Long enough for the stranger's process to start and register while the run goes on.
        const int steps = 150;
        Process? stranger = null;
        var r = await Run(1, Settings(steps), ["--set", "cluster.join-settle=0"], (line, _, addNode) =>
        {
            if (stranger is null && line.StartsWith("step     5/", StringComparison.Ordinal)) stranger = addNode(["--set", "train.micro-batch=4"]);
        });
        Assert.True(r.Code == 0, r.Text);
        SingleProcessReference.AssertMetricsMatch(r.Metrics, Reference(steps));
        Assert.NotNull(stranger);
        var (code, text) = await NodeProcesses.Finish(stranger, TimeSpan.FromSeconds(60));
        Assert.Equal(5, code);
        Assert.Contains("MicroBatch", text);
        Assert.Empty(r.Events);
    }

    [Fact]
    public async Task Below_min_nodes_the_run_pauses_until_a_node_joins_and_keeps_the_curve()
    {
        const int steps = 14;
        bool added = false;
        var r = await Run(3, Settings(steps), ["--set", "cluster.min-nodes=3", "--set", "cluster.join-settle=0",
            "--set", "cluster.fault-injection=step=6,phase=forward,worker=1,epoch=1,action=kill"], (line, _, addNode) =>
        {
            if (!added && line.Contains("cluster.min-nodes = 3", StringComparison.Ordinal))
            {
                added = true;
                addNode([]);
            }
        });
        Assert.True(r.Code == 0, r.Text);
        Assert.True(added, "the run never paused");
        Assert.Contains("paused before step 7: 2 node(s) present", r.Text);
        SingleProcessReference.AssertMetricsMatch(r.Metrics, Reference(steps));
        Assert.Equal(["node-lost", "node-joined"], r.Events.Select(e => e.GetProperty("event").GetString()));
        Assert.Contains("3 worker(s), DP 3 x PP 1", r.Text[r.Text.IndexOf("paused", StringComparison.Ordinal)..]);
    }

    [Fact]
    public async Task A_node_that_joins_and_dies_over_and_over_costs_each_time_at_most_its_redone_step()
    {
        // Two nodes train; a third joins, is SIGKILLed as soon as a step has committed with it, and a new
        // one is started in its place — three times. Each time only the step in flight is redone. A larger
        // batch makes steps slow enough for three process starts. What this checks is the cost; the curve
        // is checked by the shorter tests: over this many steps, runs laid out differently (DP 2 and 3
        // here) drift apart by float rounding beyond 1e-4 with or without faults (4e-4 by step 76 here;
        // a fault-free DP 2 run of a d-model 96 variant differs from the single process by 4e-4 at step 24).
        const int steps = 90, batch = 48;
        int kills = 0;
        Process? joiner = null;
        var r = await Run(2, Settings(steps, batch: batch), ["--set", "cluster.join-settle=0"], (line, _, addNode) =>
        {
            if (kills < 3 && joiner is null && line.StartsWith("step     5/", StringComparison.Ordinal)) joiner = addNode([]);
            else if (joiner is not null && line.StartsWith("node-joined", StringComparison.Ordinal))
            {
                joiner.Kill();
                kills++;
            }
            else if (joiner is not null && line.StartsWith("node-lost", StringComparison.Ordinal))
                joiner = kills < 3 ? addNode([]) : null;
        });
        Assert.True(r.Code == 0, r.Text);
        Assert.Equal(3, kills);
        var stepLines = File.ReadAllLines(r.Metrics).Select(l => JsonDocument.Parse(l).RootElement)
            .Where(l => !l.TryGetProperty("event", out _)).Select(l => l.GetProperty("step").GetInt32());
        Assert.Equal(Enumerable.Range(1, steps), stepLines);   // every step committed exactly once
        Assert.All(r.Events, e => Assert.True(e.GetProperty("recovery_s").GetDouble() < 10, e.ToString()));
        Assert.Equal(3, r.Events.Count(e => e.GetProperty("event").GetString() == "node-lost"));
        Assert.InRange(r.Redone, 0, kills);
    }

    // A node SIGKILLs itself in one phase of step 7 (fence step 6): each phase leaves different partial
    // state behind (nothing applied; some units applied, mirrors holding the rest; units in flight).
    [Theory]
    [InlineData("forward", 1, 1)]
    [InlineData("all-reduce", 1, 2)]
    [InlineData("backward", 3, 2)]
    [InlineData("dispatch", 1, 0)]
    [InlineData("norm", 3, 1)]
    [InlineData("update", 1, 2)]
    [InlineData("update", 3, 0)]
    public async Task A_node_killed_in_any_phase_of_a_step_costs_at_most_that_step(string phase, int pp, int rank)
    {
        const int steps = 14;
        var r = await Run(3, Settings(steps, pp), ["--set", $"cluster.fault-injection=step=6,phase={phase},worker={rank},epoch=1,action=kill"]);
        Assert.True(r.Code == 0, r.Text);
        SingleProcessReference.AssertMetricsMatch(r.Metrics, Reference(steps));
        var lost = Assert.Single(r.Events);
        Assert.Equal(7, lost.GetProperty("step").GetInt32());
        Assert.InRange(r.Redone, 0, 1);
        Assert.Equal(2, r.Nodes.Count(n => n.WaitForExit(TimeSpan.FromSeconds(60)) && n.ExitCode == 0));
    }

    [Fact]
    public async Task A_node_killed_while_handing_over_units_in_a_re_plan_loses_nothing()
    {
        // 3 workers shrink to 2 at step 6: rank 2 sends its experts away and dies doing it. Its experts live
        // on in its buddy's mirrors, so the re-plan falls back to the plan before and recovers from there.
        const int steps = 12;
        var r = await Run(3, Settings(steps), ["--set", "cluster.relayout=6=2x1", "--set", "cluster.fault-injection=step=6,phase=transfer,worker=2,epoch=2,action=kill"]);
        Assert.True(r.Code == 0, r.Text);
        SingleProcessReference.AssertMetricsMatch(r.Metrics, Reference(steps));
        Assert.Equal("node-lost", Assert.Single(r.Events).GetProperty("event").GetString());
        Assert.Equal(2, r.Nodes.Count(n => n.WaitForExit(TimeSpan.FromSeconds(60)) && n.ExitCode == 0));
    }

    [Fact]
    public async Task Without_redundancy_a_lost_node_stops_the_run_naming_the_lost_units()
    {
        var r = await Run(3, Settings(14), ["--set", "cluster.redundancy=0", "--set", "cluster.fault-injection=step=6,phase=forward,worker=1,epoch=1,action=kill"]);
        Assert.Equal(4, r.Code);
        Assert.Matches(@"unit\(s\) needed by the next plan have no holder left: expert\.", r.Text);
        // And what would have saved it.
        Assert.Contains("with --run-dir", r.Text);
        Assert.Contains("rolled back to the last one in place", r.Text);
    }

    [Fact]
    public async Task Two_nodes_holding_a_unit_and_its_mirror_SIGKILLed_at_step_37_roll_the_run_back_to_step_30_in_place()
    {
        // Redundancy 1 on 4 nodes: rank r's experts are mirrored on rank r + 1 (its buddy). Ranks 1 and 2 die
        // together while step 37 runs, so rank 1's experts have no copy left. The run directory has the checkpoint
        // of step 30: the coordinator rolls back to it in place (the two survivors load their units of it, no
        // process restarts), redoes steps 31.. and finishes — every step it ever committed, those done twice
        // included, bit-identical to the single-process loop.
        const int steps = 44;
        var settings = Settings(steps);
        settings["checkpoint.every"] = "10";
        settings["checkpoint.keep"] = "2";
        settings["cluster.redundancy"] = "1";
        settings["cluster.join-settle"] = "0";
        var reference = Reference(steps);
        var runDir = TestSupport.TempDir();
        // Ranks follow the nodes' addresses in ordinal order: give the nodes ports, and pick ranks 1 and 2.
        var ports = Enumerable.Range(0, 4).Select(_ => LoopbackPorts.Next()).ToArray();
        var byRank = ports.OrderBy(p => $"akka.tcp://elasticmoe@127.0.0.1:{p}", StringComparer.Ordinal).ToArray();
        var victims = new[] { byRank[1], byRank[2] };
        int started = 0;
        bool killed = false;
        var r = await Run(0, settings, [], (line, nodes, _) =>
        {
            if (killed || !line.StartsWith("step    36/", StringComparison.Ordinal)) return;
            killed = true;
            foreach (var port in victims) nodes[Array.IndexOf(ports, port)].Kill();   // SIGKILL, both at once
        }, expectNodes: 4, startNodes: add => { foreach (var p in ports) { add(["--port", p.ToString()]); started++; } }, coordinatorExtra: ["--run-dir", runDir]);
        Assert.True(r.Code == 0, r.Text);
        Assert.Equal(4, started);
        Assert.True(killed, "the kill line was never printed");

        var rollback = Assert.Single(r.Events, e => e.GetProperty("event").GetString() == "rollback");
        Assert.Equal(30, rollback.GetProperty("to_step").GetInt64());
        long from = rollback.GetProperty("from_step").GetInt64();
        // Killed while step 37 ran; if they died inside its update, the survivors finished 37 first.
        Assert.InRange(from, 37, 38);
        var lostUnits = rollback.GetProperty("lost_units").EnumerateArray().Select(u => u.GetString()!).ToList();
        Assert.NotEmpty(lostUnits);
        Assert.All(lostUnits, u => Assert.StartsWith("expert.", u));
        Assert.True(rollback.GetProperty("recovery_s").GetDouble() < 60, rollback.ToString());
        Assert.Equal(2, r.Events.Count(e => e.GetProperty("event").GetString() == "node-lost"));
        Assert.Contains("rolling back in place", r.Text);

        // Every step line equals the loop's, bit for bit; steps 31 .. from - 1 were committed twice, all others once.
        var lines = File.ReadAllLines(r.Metrics).Select(l => JsonDocument.Parse(l).RootElement).Where(l => !l.TryGetProperty("event", out _)).ToList();
        foreach (var l in lines)
        {
            int step = l.GetProperty("step").GetInt32();
            Assert.Equal(reference[step - 1].Loss, l.GetProperty("loss").GetDouble());
            Assert.Equal(reference[step - 1].GradNorm, l.GetProperty("grad_norm").GetDouble());
        }
        var counts = lines.GroupBy(l => l.GetProperty("step").GetInt32()).ToDictionary(g => g.Key, g => g.Count());
        Assert.Equal(Enumerable.Range(1, steps), counts.Keys.Order());
        Assert.Equal(Enumerable.Range(31, (int)from - 31), counts.Where(kv => kv.Value == 2).Select(kv => kv.Key).Order());
        Assert.All(counts.Values, c => Assert.InRange(c, 1, 2));

        // The journal says so, and the two survivors (the very processes that started) finish cleanly.
        var journaled = Assert.Single(JournalEvents(runDir).OfType<ElasticMoE.Runtime.Coordination.RolledBack>());
        Assert.Equal((from - 1, 30L), (journaled.FromStep, journaled.ToStep));
        Assert.Equal(lostUnits, journaled.LostUnits);
        await AssertSurvivorsFinishCleanly(r.Nodes.Where((_, i) => !victims.Contains(ports[i])));
    }

    private static List<ElasticMoE.Runtime.Coordination.ICoordinatorEvent> JournalEvents(string runDir)
    {
        var (events, _) = ElasticMoE.Runtime.Journal.JournalConfig.SqliteFiles(runDir);
        using var db = new Microsoft.Data.Sqlite.SqliteConnection($"Data Source={events};Mode=ReadOnly;Pooling=False");
        db.Open();
        using var cmd = db.CreateCommand();
        cmd.CommandText = "SELECT manifest, message FROM journal WHERE persistence_id = $p ORDER BY sequence_number";
        cmd.Parameters.AddWithValue("$p", ElasticMoE.Runtime.Actors.TrainingCoordinator.JournalId);
        using var rows = cmd.ExecuteReader();
        var list = new List<ElasticMoE.Runtime.Coordination.ICoordinatorEvent>();
        while (rows.Read())
            list.Add((ElasticMoE.Runtime.Coordination.ICoordinatorEvent)ElasticMoE.Runtime.Journal.CoordinatorJournalSerializer.Decode((byte[])rows[1], rows.GetString(0)));
        return list;
    }

    [Fact]
    public async Task A_rebalance_requested_while_a_node_is_being_lost_is_carried_out_once_after_the_recovery()
    {
        // PP 1 and no bias updates (loads stay skewed). Rank 1's node SIGKILLs itself as step 7 starts; the shell asks
        // for a rebalance as step 6 is reported, so the request lands while step 7 runs or while the loss is recovered
        // (or, on a slow machine, later): in every case it is carried out once, at a boundary after the loss, on the
        // survivors' plan, and the curve does not notice either.
        const int steps = 14;
        const string token = "t0k-recovery";
        var settings = Settings(steps);
        settings["model.moe.bias-update-rate"] = "0";
        int port = LoopbackPorts.Next();
        ElasticMoE.Runtime.Hosting.ShellClient? client = null;
        Task<ElasticMoE.Runtime.Protocol.IElasticMoEMessage>? request = null;
        try
        {
            var r = await Run(3, settings, ["--set", $"shell.token={token}", "--set", "cluster.fault-injection=step=6,phase=forward,worker=1,epoch=1,action=kill"],
                (line, _, _) =>
                {
                    if (line.StartsWith("step     6/", StringComparison.Ordinal))
                        request = client!.AskAsync(new ElasticMoE.Runtime.Protocol.ShellControl("rebalance", token));
                }, port,
                // Connected before any node starts, so the request goes out as soon as step 6 is reported.
                async () => client = await ConnectShell(port));
            Assert.True(r.Code == 0, r.Text);
            var ack = Assert.IsType<ElasticMoE.Runtime.Protocol.ShellAck>(await request!);
            Assert.True(ack.Ok, ack.Message);
            var reference = SingleProcessReference.Train(TestSupport.SmallConfig(settings.Select(kv => (kv.Key, kv.Value)).ToArray()), steps).Steps;
            SingleProcessReference.AssertMetricsMatch(r.Metrics, reference);
            Assert.Equal("node-lost", Assert.Single(r.Events, e => e.GetProperty("event").GetString() == "node-lost").GetProperty("event").GetString());
            // One decision (moved copies or not), taken after the loss was handled, at or after the redone step.
            var decided = Regex.Matches(r.Text, @"rebalance at step (\d+): max/mean");
            var single = Assert.Single(decided);
            Assert.InRange(long.Parse(single.Groups[1].Value), 6, steps - 1);
            int recovering = r.Text.IndexOf("recovering on 2 worker(s)", StringComparison.Ordinal);
            Assert.True(recovering >= 0 && recovering < single.Index, r.Text);
            Assert.True(r.Events.Count(e => e.GetProperty("event").GetString() == "rebalance") <= 1);
        }
        finally
        {
            if (client is not null) await client.DisposeAsync();
        }
    }

    // The coordinator's process is starting: a refused connection is answered at once, so try until it listens.
    private static async Task<ElasticMoE.Runtime.Hosting.ShellClient> ConnectShell(int port)
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(60);
        while (true)
        {
            try
            {
                return await ElasticMoE.Runtime.Hosting.ShellClient.ConnectAsync($"127.0.0.1:{port}", TimeSpan.FromSeconds(5));
            }
            catch (ElasticMoE.Runtime.Hosting.ShellUnreachableException) when (DateTime.UtcNow < deadline)
            {
                await Task.Delay(200);
            }
        }
    }
}
