using System.Diagnostics;
using System.Globalization;
using System.Text.RegularExpressions;
using ElasticMoE.Benchmarks;

namespace ElasticMoE.Cli;

/// <summary>
/// <c>bench --suite trace --trace FILE</c>: an availability trace (Bamboo / Oobleck CSV) replayed against a coordinator and
/// node processes on this machine. Time is compressed by <c>--speed</c>, node counts are scaled so the trace's peak is
/// <c>--max-nodes</c>; each removal is a SIGKILL, or with probability <c>--notice</c> a SIGTERM to a node started with a
/// 5 s preemption notice. Removals of one instant happen together, so a unit and its mirror can go at once: the run has
/// a run directory (checkpoint every 10 steps) and rolls back in place then. Reports goodput — the steps the run kept
/// per second while the trace played, against a fault-free run of as many nodes as the trace's mean for the same steps —
/// steps redone, rollbacks, and checks that every step line is the fault-free single-process run's bits.
/// </summary>
internal static partial class TraceBenchmark
{
    private const int NoticeSeconds = 5;
    private const int CheckpointEvery = 10;
    /// <summary>The replay starts once this step is committed: past the first checkpoint, so any loss can be rolled back.</summary>
    private const int ReplayFrom = CheckpointEvery + 2;

    public sealed record Options(string Trace, double Speed, int MaxNodes, double Notice, int Steps, int Seed = 1);

    public static (List<BenchFigure> Figures, bool Ok) Run(IReadOnlyList<string> configArgs, Options opt, string dir, TextWriter o)
    {
        AvailabilityTrace trace;
        try { trace = AvailabilityTrace.Parse(File.ReadAllText(opt.Trace), opt.Trace); }
        catch (Exception ex) when (ex is FormatException or IOException or UnauthorizedAccessException)
        {
            throw new ElasticMoE.Configuration.ConfigException($"--trace: {ex.Message}");
        }
        var schedule = trace.Scaled(opt.Speed, opt.MaxNodes);
        var args = RecoveryBenchmarks.BaseArgs(configArgs).Concat(["--set", "cluster.redundancy=1", "--set", $"checkpoint.every={CheckpointEvery}"]).ToList();
        o.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"trace: {opt.Trace}: {trace.Events.Count} events, at most {trace.MaxNodes} nodes at once; replayed at {opt.Speed}x with at most {opt.MaxNodes} node processes " +
            $"({schedule.Count} changes over {schedule[^1].Seconds:F0} s), removals a SIGKILL or (p = {opt.Notice}) a {NoticeSeconds} s notice; {opt.Steps} steps (logs in {dir}) ..."));
        if (ChaosBenchmark.Reference(args, opt.Steps, Path.Combine(dir, "reference"), o) is not { } reference) return ([], false);

        var rng = new Random(opt.Seed);
        var nodeArgs = new[] { "--notice-seconds", NoticeSeconds.ToString(CultureInfo.InvariantCulture) };
        string? problem = null;
        int kills = 0, notices = 0, starts = 0;
        double nodeSeconds = 0, replayStart = double.NaN, end = double.NaN;
        long stepAtReplay = 0;
        var noticed = new HashSet<ProcessCluster.Child>();
        using var cluster = new ProcessCluster(Path.Combine(dir, "trace"), args);
        var m = cluster.Metrics;
        try
        {
            var coordinator = cluster.StartCoordinator(schedule[0].Nodes, opt.Steps, ["--run-dir", Path.Combine(dir, "trace", "run")]);
            for (int i = 0; i < schedule[0].Nodes; i++) cluster.StartNode(extra: nodeArgs);
            var overall = Stopwatch.StartNew();
            void Wait(Func<bool> done, string what) => cluster.Wait(done, what, TimeSpan.FromSeconds(120), overall, TimeSpan.FromMinutes(90));
            Wait(() => m.LastStep >= ReplayFrom, $"step {ReplayFrom}");
            var clock = Stopwatch.StartNew();
            replayStart = ProcessCluster.UnixNow();
            stepAtReplay = m.LastStep;
            int target = schedule[0].Nodes;
            double last = 0;
            bool Ended() => !coordinator.Alive || m.Steps.Any(s => s.Step >= opt.Steps);
            foreach (var (at, nodes, _) in schedule.Skip(1))
            {
                Wait(() => clock.Elapsed.TotalSeconds >= at || Ended(), $"the trace's instant at {at:F1} s");
                if (Ended()) break;   // the trace outlasted the run: the rest is not replayed
                nodeSeconds += target * (clock.Elapsed.TotalSeconds - last);
                last = clock.Elapsed.TotalSeconds;
                target = nodes;
                var present = cluster.Nodes.Where(n => n.Alive && !n.Killed && !noticed.Contains(n)).ToList();
                string what;
                if (nodes > present.Count)
                {
                    for (int k = present.Count; k < nodes; k++) cluster.StartNode(extra: nodeArgs);
                    starts += nodes - present.Count;
                    what = $"+{nodes - present.Count} node(s)";
                }
                else
                {
                    // Reclaimed together: every victim's signal goes out back to back.
                    var victims = present.OrderBy(_ => rng.Next()).Take(present.Count - nodes).ToList();
                    var how = victims.Select(v => rng.NextDouble() < opt.Notice).ToList();
                    for (int k = 0; k < victims.Count; k++)
                    {
                        if (how[k]) { ProcessCluster.Terminate(victims[k]); noticed.Add(victims[k]); }
                        else ProcessCluster.Kill(victims[k]);
                    }
                    kills += how.Count(n => !n);
                    notices += how.Count(n => n);
                    what = $"-{victims.Count} node(s): {string.Join(", ", victims.Select((v, k) => $"{v.Name} {(how[k] ? "noticed" : "SIGKILL")}"))}";
                }
                o.WriteLine(string.Create(CultureInfo.InvariantCulture, $"  {at,6:F1} s, step {m.LastStep,4}: {what} -> {nodes} node(s)"));
            }
            Wait(() => !coordinator.Alive, "the end of the run");
            end = m.Steps.Where(s => s.Step >= opt.Steps).Select(s => s.SeenUnix).DefaultIfEmpty(ProcessCluster.UnixNow()).First();
            nodeSeconds += target * Math.Max(0, end - replayStart - last);
        }
        catch (ProcessCluster.Stopped ex)
        {
            problem = ex.Message;
        }
        cluster.StopAll(TimeSpan.FromSeconds(problem is null ? 15 : 0));
        m.Poll();
        int? exit = cluster.Coordinator?.Process.ExitCode;
        var text = cluster.Coordinator is { } c && File.Exists(c.Log) ? File.ReadAllText(c.Log) : "";
        int attemptsRedone = RedoneLine().Match(text) is { Success: true } r ? int.Parse(r.Groups[1].Value, CultureInfo.InvariantCulture) : 0;

        var problems = new List<string>();
        if (problem is not null) problems.Add(problem);
        if (exit != 0) problems.Add($"coordinator exit {exit}");
        var want = reference.Steps.ToDictionary(s => s.Step);
        int identical = m.Steps.Count(s => want.TryGetValue(s.Step, out var w) && s.Loss.Equals(w.Loss) && s.GradNorm.Equals(w.GradNorm));
        if (identical < m.Steps.Count) problems.Add($"{m.Steps.Count - identical} of {m.Steps.Count} step lines are not the fault-free run's bits");
        var missing = Enumerable.Range(1, opt.Steps).Where(s => m.Steps.All(x => x.Step != s)).ToList();
        if (missing.Count > 0) problems.Add($"{missing.Count} steps never committed (first {missing[0]})");
        int rollbacks = m.Events.Count(e => e.Kind == "rollback");
        int stepsTwice = m.Steps.Count - m.Steps.Select(s => s.Step).Distinct().Count();

        // Goodput: steps kept per second while the trace played, against a fault-free run on the trace's mean node count.
        double replaySeconds = end - replayStart;
        double kept = opt.Steps - stepAtReplay;
        double rate = kept / replaySeconds;
        int meanNodes = Math.Max(1, (int)Math.Round(nodeSeconds / replaySeconds, MidpointRounding.AwayFromZero));
        double baseline = problems.Count == 0 ? FaultFreeRate(args, meanNodes, opt.Steps, Path.Combine(dir, "fault-free"), o) : double.NaN;
        double goodput = rate / baseline;

        o.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"  {kills} SIGKILL(s), {notices} notice(s), {starts} node(s) started; {rollbacks} rollback(s), {stepsTwice} step(s) committed twice (rolled back), " +
            $"{attemptsRedone} attempt(s) redone; {identical} of {m.Steps.Count} step lines bit-identical to the fault-free run"));
        o.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"  goodput: {kept:F0} steps kept in {replaySeconds:F1} s of trace ({rate:F3} steps/s, {nodeSeconds / replaySeconds:F2} nodes on average) " +
            $"against {baseline:F3} steps/s fault-free on {meanNodes} node(s): {goodput:F3}"));
        o.WriteLine(problems.Count == 0 ? "  trace: PASS" : $"  trace: FAIL: {string.Join("; ", problems)} (logs in {dir})");
        var figures = new List<BenchFigure>
        {
            new("trace goodput (steps/s kept)", rate, "steps/s", $"fault-free, {meanNodes} node(s)", baseline),
            new("trace rollbacks", rollbacks, "rollbacks"),
            new("trace steps redone", stepsTwice + attemptsRedone, "steps"),
            new("trace step lines bit-identical", identical, "lines", "step lines", m.Steps.Count),
        };
        return (figures, problems.Count == 0);
    }

    /// <summary>Steps per second of a fault-free run on <paramref name="nodes"/> node processes, between its 10th step and its last.</summary>
    private static double FaultFreeRate(IReadOnlyList<string> args, int nodes, int steps, string dir, TextWriter o)
    {
        using var cluster = new ProcessCluster(dir, args);
        var m = cluster.Metrics;
        var coordinator = cluster.StartCoordinator(nodes, steps);
        for (int i = 0; i < nodes; i++) cluster.StartNode();
        try
        {
            cluster.Wait(() => !coordinator.Alive, "the fault-free run's end", TimeSpan.FromSeconds(120), Stopwatch.StartNew(), TimeSpan.FromMinutes(90));
        }
        catch (ProcessCluster.Stopped ex)
        {
            o.WriteLine($"  the fault-free run failed: {ex.Message}");
            return double.NaN;
        }
        cluster.StopAll(TimeSpan.FromSeconds(15));
        m.Poll();
        var from = m.Steps.FirstOrDefault(s => s.Step == ReplayFrom);
        var to = m.Steps.LastOrDefault();
        return from is null || to is null || to.Step <= from.Step ? double.NaN : (to.Step - from.Step) / (to.SeenUnix - from.SeenUnix);
    }

    [GeneratedRegex(@"(\d+) step attempt\(s\) redone")]
    private static partial Regex RedoneLine();
}
