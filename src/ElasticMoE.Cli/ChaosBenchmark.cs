using System.Diagnostics;
using System.Globalization;
using ElasticMoE.Benchmarks;
using ElasticMoE.Runtime.Hosting;
using ElasticMoE.Runtime.Protocol;

namespace ElasticMoE.Cli;

/// <summary>
/// <c>bench --suite chaos</c>: a whole run of a coordinator and 4 node processes on loopback through random
/// events at random points of a step: SIGKILLs with a fresh node started at once, SIGKILLs that are not
/// replaced, joins of extra nodes and re-layouts between DP and DP × PP from the shell. Every committed step's
/// loss and gradient norm must be the fault-free single-process run's bits (the canonical reduction), each
/// step committed once, every kill seen as a node-lost line.
/// </summary>
internal static class ChaosBenchmark
{
    public enum Kind { KillAndReplace, Kill, Join, Relayout }

    private sealed record Event(int Index, Kind Kind, long AfterStep, string What)
    {
        public MetricsTail.EventLine? Lost { get; set; }
        public double KillUnix { get; init; } = double.NaN;
        public double Total => Lost is { } e ? e.DetectedUnix - KillUnix + e.RecoverySeconds : double.NaN;
    }

    private const string Token = "chaos-bench";
    /// <summary>Node processes alive at most (4 planned at start, one join more).</summary>
    private const int MaxNodes = 5;

    public static (List<BenchFigure> Figures, bool Ok) Run(IReadOnlyList<string> configArgs, int events, int steps, string dir, TextWriter o)
    {
        var args = RecoveryBenchmarks.BaseArgs(configArgs);
        o.WriteLine($"chaos: fault-free reference (single process, {steps} steps), then coordinator + 4 node processes through {events} random events " +
                    $"(kill + fresh node, kill alone, join, re-layout from the shell) at random points of a step (logs in {dir}) ...");
        if (Reference(args, steps, dir, o) is not { } refMetrics) return ([], false);

        int seed = Environment.TickCount;
        var rng = new Random(seed);
        var log = new List<Event>();
        string? problem = null;
        int? coordinatorExit;
        using var cluster = new ProcessCluster(dir, args);
        var m = cluster.Metrics;
        try
        {
            var coordinator = cluster.StartCoordinator(4, steps, ["--set", $"shell.token={Token}"]);
            for (int i = 0; i < 4; i++) cluster.StartNode();
            var overall = Stopwatch.StartNew();

            void Wait(Func<bool> done, string what) => cluster.Wait(done, what, TimeSpan.FromSeconds(90), overall, TimeSpan.FromMinutes(90));

            Wait(() => m.LastStep >= 1, "the first step");
            foreach (var n in cluster.Nodes) n.Planned = true;
            var client = ShellClient.ConnectAsync($"127.0.0.1:{cluster.Port}", TimeSpan.FromSeconds(20)).GetAwaiter().GetResult();
            try
            {
                var targets = RecoveryBenchmarks.SpreadTargets(steps, events, rng);
                long ready = m.LastStep;
                for (int k = 0; k < events; k++)
                {
                    long target = Math.Max(targets[k], ready + 2);
                    if (target > steps - 5) { problem = $"only {k} of {events} events fit in {steps} steps"; break; }
                    Wait(() => m.LastStep >= target, $"step {target}");
                    var planned = cluster.Nodes.Where(n => n.Planned && n.Alive).ToList();
                    int alive = cluster.Nodes.Count(n => n.Alive);
                    var kinds = new List<Kind> { Kind.Relayout };
                    if (planned.Count >= 2) kinds.Add(Kind.KillAndReplace);
                    if (planned.Count >= 3) kinds.Add(Kind.Kill);
                    if (alive < MaxNodes) kinds.Add(Kind.Join);
                    var kind = kinds[rng.Next(kinds.Count)];
                    cluster.PauseIntoNextStep(rng);
                    long at = m.LastStep;
                    switch (kind)
                    {
                        case Kind.KillAndReplace or Kind.Kill:
                        {
                            var victim = planned[rng.Next(planned.Count)];
                            double t = ProcessCluster.Kill(victim);
                            var e = new Event(k + 1, kind, at, $"SIGKILL {victim.Name}{(kind == Kind.KillAndReplace ? " + a fresh node" : "")}") { KillUnix = t };
                            log.Add(e);
                            if (kind == Kind.KillAndReplace) cluster.StartNode();
                            Wait(() => (e.Lost = m.Events.FirstOrDefault(x => x.Kind == "node-lost" && x.Node == victim.Address)) is not null, $"the node-lost line of {victim.Name}");
                            break;
                        }
                        case Kind.Join:
                        {
                            var fresh = cluster.StartNode();
                            log.Add(new Event(k + 1, kind, at, $"start {fresh.Name}"));
                            Wait(() => fresh.Planned || !fresh.Alive, $"{fresh.Name} to join");
                            break;
                        }
                        case Kind.Relayout:
                        {
                            var plan = client.AskAsync(new ShellPlanQuery()).GetAwaiter().GetResult() as ShellPlan
                                       ?? throw new ProcessCluster.Stopped("the shell's plan query got no plan");
                            int pp = plan.Pp == 1 ? 2 : 1;
                            int workers = planned.Count / pp * pp;
                            if (workers < 1) { pp = 1; workers = planned.Count; }
                            var reply = client.AskAsync(new ShellControlCommand("relayout", [workers.ToString(CultureInfo.InvariantCulture), pp.ToString(CultureInfo.InvariantCulture)], Token)).GetAwaiter().GetResult();
                            var what = reply is ShellAck { Ok: true } ? $"relayout {workers}x{pp} (from DP {plan.Dp} x PP {plan.Pp})" : $"relayout {workers}x{pp} refused: {(reply as ShellAck)?.Message ?? reply.ToString()}";
                            log.Add(new Event(k + 1, kind, at, what));
                            long from = m.LastStep;
                            Wait(() => m.LastStep >= from + 2, "two steps after the re-layout");
                            break;
                        }
                    }
                    var last = log[^1];
                    o.WriteLine(string.Create(CultureInfo.InvariantCulture,
                        $"  event {last.Index,2} after step {last.AfterStep,4}: {last.What}{(last.Lost is { } l ? $"; detected {(l.DetectedUnix - last.KillUnix) * 1000:F0} ms, next step {last.Total:F2} s after the kill" : "")}"));
                    ready = m.LastStep;
                }
            }
            finally
            {
                client.DisposeAsync().AsTask().GetAwaiter().GetResult();
            }
            Wait(() => !coordinator.Alive, "the end of the run");
        }
        catch (ProcessCluster.Stopped ex)
        {
            problem = ex.Message;
        }
        cluster.StopAll(TimeSpan.FromSeconds(problem is null ? 15 : 0));
        m.Poll();
        coordinatorExit = cluster.Coordinator?.Process.ExitCode;
        return Judge(log, m, refMetrics, events, steps, coordinatorExit, problem, seed, dir, cluster, o);
    }

    /// <summary>The fault-free single-process run of <paramref name="steps"/> steps (its metrics), in a process of its own; null (said) when it fails.</summary>
    public static MetricsTail? Reference(IReadOnlyList<string> args, int steps, string dir, TextWriter o)
    {
        Directory.CreateDirectory(dir);
        var refMetrics = new MetricsTail(Path.Combine(dir, "reference.jsonl"));
        var refLog = Path.Combine(dir, "reference.log");
        var reference = ProcessCluster.Launch("reference", refLog, new[] { "train", "--single-process", "--steps", steps.ToString(CultureInfo.InvariantCulture), "--metrics", refMetrics.Path }.Concat(args));
        using (reference.Process)
        {
            if (!reference.Process.WaitForExit(TimeSpan.FromMinutes(60))) reference.Process.Kill();
            reference.Process.WaitForExit();
            if (reference.Process.ExitCode != 0) { o.WriteLine($"  the reference run failed (exit {reference.Process.ExitCode}); see {refLog}"); return null; }
        }
        refMetrics.Poll();
        return refMetrics;
    }

    private static (List<BenchFigure>, bool) Judge(List<Event> log, MetricsTail m, MetricsTail reference, int events, int steps, int? coordinatorExit,
        string? problem, int seed, string dir, ProcessCluster cluster, TextWriter o)
    {
        var problems = new List<string>();
        if (problem is not null) problems.Add(problem);
        if (coordinatorExit != 0) problems.Add($"coordinator exit {coordinatorExit}");
        var byStep = m.Steps.GroupBy(s => s.Step).ToDictionary(g => g.Key, g => g.ToList());
        var dup = byStep.Where(kv => kv.Value.Count > 1).Select(kv => kv.Key).ToList();
        var missing = Enumerable.Range(1, steps).Where(s => !byStep.ContainsKey(s)).ToList();
        if (dup.Count > 0) problems.Add($"steps logged twice: {string.Join(",", dup.Take(10))}");
        if (missing.Count > 0) problems.Add($"{missing.Count} steps missing (first {missing[0]})");
        int compared = 0, identical = 0;
        double maxRel = 0;
        long worst = 0;
        foreach (var want in reference.Steps)
        {
            if (!byStep.TryGetValue(want.Step, out var have)) continue;
            compared++;
            if (have[0].Loss.Equals(want.Loss) && have[0].GradNorm.Equals(want.GradNorm)) identical++;
            double rel = Math.Abs(have[0].Loss - want.Loss) / Math.Abs(want.Loss);
            if (!(rel <= maxRel)) { maxRel = rel; worst = want.Step; }
        }
        if (compared < steps) problems.Add($"only {compared} of {steps} steps compared with the reference");
        if (identical < compared) problems.Add(string.Create(CultureInfo.InvariantCulture, $"{compared - identical} steps are not bit-identical to the fault-free run (max relative loss difference {maxRel:E2}, step {worst})"));
        var kills = log.Where(e => e.Kind is Kind.Kill or Kind.KillAndReplace).ToList();
        var handled = kills.Where(e => e.Lost is not null).ToList();
        if (handled.Count < kills.Count) problems.Add($"{kills.Count - handled.Count} kills without a node-lost line");
        if (log.Count < events) problems.Add($"{log.Count} of {events} events happened");
        if (m.Events.Any(e => !double.IsFinite(e.RecoverySeconds))) problems.Add("event lines without a recovery time");
        var relayouts = log.Count(e => e.Kind == Kind.Relayout && !e.What.Contains("refused", StringComparison.Ordinal));

        var totals = handled.Select(e => e.Total).ToList();
        o.WriteLine($"  {log.Count} events (seed {seed}): {string.Join(", ", log.GroupBy(e => e.Kind).Select(g => $"{g.Key} {g.Count()}"))}; {relayouts} re-layouts accepted; " +
                    $"{m.Events.Count(e => e.Kind == "node-joined")} node-joined and {m.Events.Count(e => e.Kind == "node-lost")} node-lost lines, {m.Steps.Count} step lines for {steps} steps, coordinator exit {coordinatorExit}");
        o.WriteLine($"  node exits (not killed): {string.Join(", ", cluster.Nodes.Where(n => !n.Killed).Select(n => $"{n.Name} {n.Process.ExitCode}"))}");
        if (totals.Count > 0)
            o.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"  kill -> next committed step: median {RecoveryBenchmarks.Median(totals):F2} s, p95 {RecoveryBenchmarks.Percentile(totals, 0.95):F2} s, max {totals.Max():F2} s"));
        o.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"  {identical} of {compared} steps bit-identical to the fault-free run in loss and gradient norm (all must be); max relative loss difference {maxRel:E2}"));
        o.WriteLine(problems.Count == 0 ? "  chaos: PASS" : $"  chaos: FAIL: {string.Join("; ", problems)} (logs in {dir})");
        var figures = new List<BenchFigure>
        {
            new("chaos steps bit-identical", identical, "steps", "steps run", steps),
            new("chaos kills handled", handled.Count, "kills", "kills sent", kills.Count),
            new("chaos kill -> next step, median", RecoveryBenchmarks.Median(totals), "s"),
            new("chaos kill -> next step, p95", RecoveryBenchmarks.Percentile(totals, 0.95), "s"),
        };
        return (figures, problems.Count == 0);
    }
}
