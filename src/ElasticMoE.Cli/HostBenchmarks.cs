using System.Diagnostics;
using System.Globalization;
using ElasticMoE.Benchmarks;

namespace ElasticMoE.Cli;

/// <summary>
/// <c>bench --suite hosts</c>: real processes on test hosts made of network namespaces (<see cref="HostRack"/>), a
/// coordinator on host 0 and a node on each other host. Faults are a pulled cable (the switch port down: silence, no
/// TCP reset, as a power loss or a dead switch port) and, for comparison in the same run, a SIGKILL (the kernel resets
/// the connections at once).
/// </summary>
internal static class HostBenchmarks
{
    public enum Fault { Cut, Kill }

    /// <summary>One fault and what the coordinator logged for it.</summary>
    public sealed record Event(int Index, Fault Fault, string Node, string Address, double AtUnix, long StepsDone)
    {
        public MetricsTail.EventLine? Lost { get; set; }
        public double Detection => Lost is { } e ? e.DetectedUnix - AtUnix : double.NaN;
        /// <summary>Fault → next committed step.</summary>
        public double Total => Lost is { } e ? Detection + e.RecoverySeconds : double.NaN;
        /// <summary>The replacement node started → its node-joined line (registered and planned in).</summary>
        public double Join { get; set; } = double.NaN;
    }

    /// <summary>
    /// Silent loss: <paramref name="faults"/> link cuts of a node host out of three, alternating with as many SIGKILLs,
    /// each followed (once the loss is handled) by a fresh node on the same host.
    /// </summary>
    public static (List<BenchFigure> Figures, bool Ok) SilentLoss(IReadOnlyList<string> configArgs, int faults, string dir, TextWriter o)
    {
        if (HostRack.Unavailable is { } why)
        {
            o.WriteLine($"hosts: SKIPPED: {why}");
            return ([], true);
        }
        o.WriteLine($"hosts: coordinator + 3 node hosts (network namespaces on a bridge), {faults} link cuts and {faults} SIGKILLs of a node, alternating, a fresh node on the host after each (logs in {dir}) ...");
        var rng = new Random(Environment.TickCount);
        using var rack = new HostRack(4);
        // The recovery suites' settings, but the default join-settle: joins are measured here as a user gets them.
        var args = RecoveryBenchmarks.BaseArgs(["--set", "cluster.join-settle=0.5", .. configArgs]).Concat(["--set", "cluster.redundancy=1"]).ToList();
        using var cluster = new ProcessCluster(dir, args, rack);
        var m = cluster.Metrics;
        var events = new List<Event>();
        string? problem = null;
        int burstPlans = 0;
        var overall = Stopwatch.StartNew();
        try
        {
            var coordinator = cluster.StartCoordinator(3, 1_000_000);
            for (int i = 0; i < 3; i++) cluster.StartNode(1 + i);
            void Wait(Func<bool> done, string what) => cluster.Wait(done, what, TimeSpan.FromSeconds(60), overall, TimeSpan.FromMinutes(5 + 2 * faults));
            Wait(() => m.LastStep >= 1, "the first step");
            foreach (var n in cluster.Nodes) n.Planned = true;
            for (int k = 0; k < 2 * faults; k++)
            {
                var fault = k % 2 == 0 ? Fault.Cut : Fault.Kill;
                long target = m.LastStep + rng.Next(3, 7);
                Wait(() => m.LastStep >= target, $"step {target}");
                cluster.PauseIntoNextStep(rng);
                var planned = cluster.Nodes.Where(n => n.Planned && n.Alive && !n.Killed).ToList();
                var victim = planned[rng.Next(planned.Count)];
                double at = ProcessCluster.UnixNow();
                if (fault == Fault.Cut) rack.Cut(victim.Host);
                else ProcessCluster.Kill(victim);
                var e = new Event(k + 1, fault, victim.Name, victim.Address!, at, m.LastStep);
                events.Add(e);
                Wait(() => (e.Lost = m.Events.FirstOrDefault(x => x.Kind == "node-lost" && x.Node == e.Address)) is not null, $"the node-lost line of {victim.Name}");
                if (fault == Fault.Cut)
                {
                    // The cut-off node is done with (its own handling of a lost coordinator is the partition tests'
                    // subject); the host gets its cable back and a fresh node.
                    ProcessCluster.Kill(victim);
                    victim.Process.WaitForExit();
                    rack.Heal(victim.Host);
                }
                var started = ProcessCluster.UnixNow();
                var fresh = cluster.StartNode(victim.Host);
                Wait(() => fresh.Planned, $"{fresh.Name} to join");
                var joined = m.Events.FirstOrDefault(x => x.Kind == "node-joined" && x.Node == fresh.Address);
                e.Join = joined is null ? double.NaN : joined.DetectedUnix - started;
                o.WriteLine(Line(e));
            }
            // A burst: one more node on each node host at once, which must be planned in with one re-plan.
            long before = m.LastStep;
            var burst = Enumerable.Range(1, 3).Select(h => cluster.StartNode(h)).ToList();
            Wait(() => burst.All(n => n.Planned), "a burst of 3 nodes to join");
            burstPlans = m.Events.Where(x => x.Kind == "node-joined" && burst.Any(n => n.Address == x.Node)).Select(x => x.Step).Distinct().Count();
            o.WriteLine($"  burst of {burst.Count} nodes started together: planned in with {burstPlans} re-plan(s)");
            ProcessCluster.Terminate(coordinator);
            if (!coordinator.Process.WaitForExit(TimeSpan.FromSeconds(30))) problem = "the coordinator did not stop within 30 s of SIGTERM";
        }
        catch (ProcessCluster.Stopped ex)
        {
            problem = ex.Message;
        }
        cluster.StopAll(TimeSpan.FromSeconds(problem is null ? 15 : 0));
        m.Poll();
        if (problem is not null) o.WriteLine($"  PROBLEM: {problem} (logs in {dir})");
        var figures = new List<BenchFigure>();
        var steps = m.Steps.Select(s => s.Seconds).ToList();
        foreach (var kind in new[] { Fault.Cut, Fault.Kill })
        {
            var done = events.Where(x => x.Fault == kind && x.Lost is not null).ToList();
            if (done.Count == 0) continue;
            string name = kind == Fault.Cut ? "link cut" : "SIGKILL";
            double median = RecoveryBenchmarks.Median(done.Select(x => x.Total)), p95 = RecoveryBenchmarks.Percentile(done.Select(x => x.Total), 0.95);
            figures.Add(new($"{name} -> next step, median ({done.Count})", median, "s", "median step, same run", RecoveryBenchmarks.Median(steps)));
            figures.Add(new($"{name} -> next step, p95 ({done.Count})", p95, "s", "median step, same run", RecoveryBenchmarks.Median(steps)));
            void Part(string part, Func<Event, double> f) =>
                figures.Add(new($"  {name}: {part}, median", RecoveryBenchmarks.Median(done.Select(f)) * 1000, "ms", "median step, same run", RecoveryBenchmarks.Median(steps) * 1000));
            Part("detection", x => x.Detection);
            Part("re-plan", x => x.Lost!.ReplanSeconds);
            Part("unit install", x => x.Lost!.InstallSeconds);
            Part("redone step", x => x.Lost!.RedoSeconds);
            o.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"  {name} -> next committed step: median {median:F2} s, p95 {p95:F2} s, max {done.Max(x => x.Total):F2} s{(kind == Fault.Cut ? $" (target p95 <= 2 s: {(p95 <= 2 ? "met" : "NOT met")})" : "")}"));
        }
        // Registration -> next committed step, from the coordinator's node-joined lines: settle window, install, first step.
        var joinLines = m.Events.Where(x => x.Kind == "node-joined" && double.IsFinite(x.RecoverySeconds)).ToList();
        if (joinLines.Count > 0)
        {
            double jm = RecoveryBenchmarks.Median(joinLines.Select(x => x.RecoverySeconds)), jp = RecoveryBenchmarks.Percentile(joinLines.Select(x => x.RecoverySeconds), 0.95);
            figures.Add(new($"join: registration -> next step, median ({joinLines.Count})", jm, "s", "median step, same run", RecoveryBenchmarks.Median(steps)));
            figures.Add(new($"join: registration -> next step, p95 ({joinLines.Count})", jp, "s", "median step, same run", RecoveryBenchmarks.Median(steps)));
            figures.Add(new("  join: settle + wait for a boundary, median", RecoveryBenchmarks.Median(joinLines.Select(x => x.ReplanSeconds)) * 1000, "ms", "median step, same run", RecoveryBenchmarks.Median(steps) * 1000));
            figures.Add(new("  join: unit install, median", RecoveryBenchmarks.Median(joinLines.Select(x => x.InstallSeconds)) * 1000, "ms", "median step, same run", RecoveryBenchmarks.Median(steps) * 1000));
            figures.Add(new("  join: first step of the plan, median", RecoveryBenchmarks.Median(joinLines.Select(x => x.RedoSeconds)) * 1000, "ms", "median step, same run", RecoveryBenchmarks.Median(steps) * 1000));
            o.WriteLine(string.Create(CultureInfo.InvariantCulture, $"  join: registration -> next committed step: median {jm:F2} s, p95 {jp:F2} s (target <= 2 s: {(jp <= 2 ? "met" : "NOT met")})"));
        }
        if (burstPlans > 0) figures.Add(new("burst of 3 joins: re-plans", burstPlans, "plans", null, null));
        var joins = events.Select(x => x.Join).Where(double.IsFinite).ToList();
        if (joins.Count > 0)
        {
            figures.Add(new($"fresh node start -> planned in, median ({joins.Count})", RecoveryBenchmarks.Median(joins), "s", "median step, same run", RecoveryBenchmarks.Median(steps)));
            o.WriteLine(string.Create(CultureInfo.InvariantCulture, $"  fresh node started -> planned in: median {RecoveryBenchmarks.Median(joins):F2} s, p95 {RecoveryBenchmarks.Percentile(joins, 0.95):F2} s"));
        }
        return (figures, problem is null && events.All(x => x.Lost is not null) && burstPlans == 1);
    }

    /// <summary>
    /// Bandwidth: a coordinator and 2 node hosts at DP 2, the same run uncapped and then with each node host's egress
    /// capped at <paramref name="mbit"/> Mbit/s (tc tbf): bytes each node host sends per step (the kernel's counter:
    /// everything, data plane and remoting), step time, and how much of the cap the step's traffic uses.
    /// </summary>
    public static (List<BenchFigure> Figures, bool Ok) Bandwidth(IReadOnlyList<string> configArgs, double mbit, string dir, TextWriter o)
    {
        if (HostRack.Unavailable is { } why)
        {
            o.WriteLine($"hosts bandwidth: SKIPPED: {why}");
            return ([], true);
        }
        const int window = 15;
        o.WriteLine(string.Create(CultureInfo.InvariantCulture, $"hosts bandwidth: coordinator + 2 node hosts, DP 2, {window} steps uncapped then {window} steps with each node host's egress capped at {mbit} Mbit/s, same run (logs in {dir}) ..."));
        using var rack = new HostRack(3);
        var args = RecoveryBenchmarks.BaseArgs(configArgs).Concat(["--set", "cluster.redundancy=1"]).ToList();
        using var cluster = new ProcessCluster(dir, args, rack);
        var m = cluster.Metrics;
        var overall = Stopwatch.StartNew();
        var figures = new List<BenchFigure>();
        try
        {
            var coordinator = cluster.StartCoordinator(2, 1_000_000);
            cluster.StartNode(1);
            cluster.StartNode(2);
            void Wait(Func<bool> done, string what) => cluster.Wait(done, what, TimeSpan.FromSeconds(120), overall, TimeSpan.FromMinutes(10));
            (double BytesPerStep, double StepSeconds) Measure()
            {
                long from = m.LastStep;
                long tx = rack.BytesSent(1) + rack.BytesSent(2);
                Wait(() => m.LastStep >= from + window, $"step {from + window}");
                long sent = rack.BytesSent(1) + rack.BytesSent(2) - tx;
                var steps = m.Steps.Where(x => x.Step > from).Select(x => x.Seconds).ToList();
                return (sent / 2.0 / (m.LastStep - from), RecoveryBenchmarks.Median(steps));
            }
            Wait(() => m.LastStep >= 5, "step 5");
            var free = Measure();
            rack.Cap(1, mbit);
            rack.Cap(2, mbit);
            long capped0 = m.LastStep;
            Wait(() => m.LastStep >= capped0 + 2, "two steps under the cap");
            var capped = Measure();
            ProcessCluster.Terminate(coordinator);
            coordinator.Process.WaitForExit(TimeSpan.FromSeconds(30));
            double use = capped.BytesPerStep * 8 / capped.StepSeconds / (mbit * 1e6);
            o.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"  per node host and step: {capped.BytesPerStep / 1e6:F2} MB sent under the cap ({free.BytesPerStep / 1e6:F2} MB uncapped); step {capped.StepSeconds:F3} s capped vs {free.StepSeconds:F3} s ({capped.StepSeconds / free.StepSeconds:F2}x); the step's traffic fills {use:P0} of the cap over the whole step"));
            figures.Add(new("bandwidth: MB sent per node host and step, capped", capped.BytesPerStep / 1e6, "MB", "uncapped, same run", free.BytesPerStep / 1e6));
            figures.Add(new(string.Create(CultureInfo.InvariantCulture, $"bandwidth: median step at {mbit} Mbit/s"), capped.StepSeconds, "s", "uncapped, same run", free.StepSeconds));
            figures.Add(new("bandwidth: share of the cap used over a step", use, "", null, null));
        }
        catch (ProcessCluster.Stopped ex)
        {
            o.WriteLine($"  PROBLEM: {ex.Message} (logs in {dir})");
            return (figures, false);
        }
        finally
        {
            cluster.StopAll(TimeSpan.FromSeconds(15));
        }
        return (figures, true);
    }

    private static string Line(Event e) => e.Lost is { } l
        ? string.Create(CultureInfo.InvariantCulture,
            $"  {e.Index,2} {(e.Fault == Fault.Cut ? "cut " : "kill")} {e.Node,-6} after step {e.StepsDone,4}: detected {e.Detection * 1000,5:F0} ms, re-plan {l.ReplanSeconds * 1000,5:F0} ms, install {l.InstallSeconds * 1000,5:F0} ms, redone step {l.RedoSeconds * 1000,5:F0} ms; next step {e.Total:F2} s after; fresh node planned in {e.Join:F2} s after its start")
        : $"  {e.Index,2} {e.Fault} {e.Node}: no node-lost line";
}
