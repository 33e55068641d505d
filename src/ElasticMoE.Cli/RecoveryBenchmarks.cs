using System.Diagnostics;
using System.Globalization;
using System.Text.RegularExpressions;
using ElasticMoE.Benchmarks;

namespace ElasticMoE.Cli;

/// <summary>
/// Benchmarks of elastic recovery with real processes and real SIGKILLs: a coordinator and
/// <c>elasticmoe node</c>s of this executable on loopback, nodes killed from outside at random times
/// (so in random phases of a step) and replaced by fresh ones.
/// <list type="bullet">
/// <item><c>recovery</c> (P4): kill → next committed step over N kills, broken down, next to torchrun's figures from the same run.</item>
/// <item><c>redundancy</c>: tokens/s of fault-free runs with buddy mirrors on and off, alternating.</item>
/// </list>
/// </summary>
internal static class RecoveryBenchmarks
{
    /// <param name="Nodes">Node processes kept running (a killed one is replaced).</param>
    /// <param name="Kills">SIGKILLs to send.</param>
    /// <param name="Steps">Steps of the run; the kills are spread over it (open-ended runs: the run is stopped with SIGTERM after the last kill).</param>
    /// <param name="OpenEnded">Stop the run after the last kill instead of letting it reach <paramref name="Steps"/>.</param>
    /// <param name="WaitForJoin">Before the next kill, wait until the replacement is part of the plan (the world is back at <paramref name="Nodes"/>).</param>
    /// <param name="MinGap">Committed steps after the previous event was handled before the next kill.</param>
    /// <param name="MaxGap">Open-ended runs: the gap is drawn from [MinGap, MaxGap].</param>
    public sealed record KillPlan(int Nodes, int Kills, int Steps, bool OpenEnded, bool WaitForJoin, int MinGap, int MaxGap, TimeSpan Timeout, int Seed);

    /// <summary>One SIGKILL and what the coordinator logged for it.</summary>
    /// <param name="IntoStep">Seconds from the last step line seen to the kill: where in the step it landed.</param>
    public sealed record Kill(int Index, string Node, string Address, double KillUnix, long StepsDone, double IntoStep)
    {
        public MetricsTail.EventLine? Lost { get; set; }
        /// <summary>The coordinator's state when it found the node gone (Computing, Updating, Installing, ...), from its log.</summary>
        public string Phase { get; set; } = "?";
        public double Detection => Lost is { } e ? e.DetectedUnix - KillUnix : double.NaN;
        /// <summary>SIGKILL → next committed step.</summary>
        public double Total => Lost is { } e ? Detection + e.RecoverySeconds : double.NaN;
    }

    public sealed record Outcome(string Dir, IReadOnlyList<Kill> Kills, MetricsTail Metrics, int? CoordinatorExit, IReadOnlyList<(string Name, bool Killed, int? Exit)> Nodes, string? Problem);

    /// <summary>Settings every process of these benchmarks gets before the user's: one libtorch thread each,
    /// no periodic validation (it would add pauses to the timings), a short join settle.</summary>
    public static IReadOnlyList<string> BaseArgs(IReadOnlyList<string> user)
    {
        var a = new List<string>();
        if (!user.Contains("--threads")) a.AddRange(["--threads", "1"]);
        a.AddRange(["--set", "train.eval-every=1000000", "--set", "cluster.join-settle=0.3"]);
        a.AddRange(user);
        return a;
    }

    /// <summary>Runs a coordinator and <see cref="KillPlan.Nodes"/> nodes and kills nodes as <paramref name="plan"/> says.</summary>
    public static Outcome RunKills(KillPlan plan, IReadOnlyList<string> configArgs, string dir, TextWriter log)
    {
        var rng = new Random(plan.Seed);
        using var cluster = new ProcessCluster(dir, configArgs);
        var m = cluster.Metrics;
        var kills = new List<Kill>();
        string? problem = null;
        var overall = Stopwatch.StartNew();
        int? coordinatorExit = null;
        try
        {
            var coordinator = cluster.StartCoordinator(plan.Nodes, plan.Steps);
            for (int i = 0; i < plan.Nodes; i++) cluster.StartNode();

            void Wait(Func<bool> done, string what) => cluster.Wait(done, what, TimeSpan.FromSeconds(60), overall, plan.Timeout);

            Wait(() => m.LastStep >= 1, "the first step");
            foreach (var n in cluster.Nodes) n.Planned = true;   // the first plan takes every expected node
            long[] targets = plan.OpenEnded ? [] : SpreadTargets(plan.Steps, plan.Kills, rng);
            long ready = m.LastStep;
            for (int k = 0; k < plan.Kills; k++)
            {
                long target = plan.OpenEnded ? ready + rng.Next(plan.MinGap, plan.MaxGap + 1) : Math.Max(targets[k], ready + plan.MinGap);
                if (!plan.OpenEnded && target > plan.Steps - 3)
                {
                    problem = $"only {k} of {plan.Kills} kills fit in {plan.Steps} steps";
                    break;
                }
                Wait(() => m.LastStep >= target, $"step {target}");
                cluster.PauseIntoNextStep(rng);
                var planned = cluster.Nodes.Where(n => n.Planned && n.Alive).ToList();
                if (planned.Count < 2) throw new ProcessCluster.Stopped($"only {planned.Count} planned node(s) alive at kill {k + 1}");
                var victim = planned[rng.Next(planned.Count)];
                var last = m.Steps[^1];
                double t = ProcessCluster.Kill(victim);
                var kill = new Kill(k + 1, victim.Name, victim.Address!, t, last.Step, t - last.SeenUnix);
                kills.Add(kill);
                Wait(() => (kill.Lost = m.Events.FirstOrDefault(e => e.Kind == "node-lost" && e.Node == kill.Address)) is not null, $"the node-lost line of {victim.Name}");
                kill.Phase = PhaseOf(coordinator.Log, kill.Address);
                log.WriteLine(Line(kill));
                // Started once the loss is handled: the replacement's start-up does not compete with the recovery measured.
                var fresh = cluster.StartNode();
                if (plan.WaitForJoin) Wait(() => fresh.Planned, $"{fresh.Name} to join");
                ready = m.LastStep;
            }
            if (plan.OpenEnded)
            {
                ProcessCluster.Terminate(coordinator);
                if (!coordinator.Process.WaitForExit(TimeSpan.FromSeconds(30))) problem ??= "the coordinator did not stop within 30 s of SIGTERM";
            }
            else
            {
                Wait(() => !coordinator.Alive, "the end of the run");
            }
        }
        catch (ProcessCluster.Stopped ex)
        {
            problem = ex.Message;
        }
        cluster.StopAll(TimeSpan.FromSeconds(problem is null ? 15 : 0));
        m.Poll();
        if (cluster.Coordinator is { } c) coordinatorExit = c.Process.ExitCode;
        var nodes = cluster.Nodes.Select(n => (n.Name, n.Killed, n.Killed ? (int?)null : n.Process.ExitCode)).ToList();
        return new Outcome(dir, kills, m, coordinatorExit, nodes, problem);
    }

    // "node ADDRESS is gone (...) at step N (Computing); recovering on ..."
    private static string PhaseOf(string coordinatorLog, string address)
    {
        using var s = new FileStream(coordinatorLog, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
        using var r = new StreamReader(s);
        var m = Regex.Match(r.ReadToEnd(), $@"node {Regex.Escape(address)} is gone .*? at step \d+ \((\w+)\)");
        return m.Success ? m.Groups[1].Value : "?";
    }

    /// <summary>How many kills found the coordinator in each state, e.g. "Computing 9, Updating 1".</summary>
    public static string Phases(IEnumerable<Kill> kills) =>
        string.Join(", ", kills.GroupBy(k => k.Phase).OrderByDescending(g => g.Count()).Select(g => $"{g.Key} {g.Count()}"));

    /// <summary>Fixed-length runs: one target step per event, spread evenly over <paramref name="steps"/> with a random offset inside each share.</summary>
    public static long[] SpreadTargets(int steps, int events, Random rng)
    {
        const int first = 5;
        double share = (steps - first - 10) / (double)events;
        return Enumerable.Range(0, events).Select(k => first + (long)(k * share + rng.NextDouble() * share * 0.5)).ToArray();
    }

    private static string Line(Kill k) => k.Lost is { } e
        ? string.Create(CultureInfo.InvariantCulture,
            $"  kill {k.Index,2}: {k.Node,-6} after step {k.StepsDone,4} (+{k.IntoStep * 1000,4:F0} ms, {k.Phase}): detected {k.Detection * 1000,5:F0} ms, re-plan {e.ReplanSeconds * 1000,5:F0} ms, install {e.InstallSeconds * 1000,5:F0} ms, redone step {e.RedoSeconds * 1000,5:F0} ms; next step {k.Total:F2} s after the kill")
        : $"  kill {k.Index,2}: {k.Node} after step {k.StepsDone}: no node-lost line";

    // ------------------------------------------------------------------ statistics

    public static double Median(IEnumerable<double> xs) => Percentile(xs, 0.5);

    /// <summary>Nearest-rank percentile (p95 of 10 values is the largest); NaN for none.</summary>
    public static double Percentile(IEnumerable<double> xs, double p)
    {
        var s = xs.Where(double.IsFinite).Order().ToList();
        if (s.Count == 0) return double.NaN;
        if (p == 0.5 && s.Count % 2 == 0) return (s[s.Count / 2 - 1] + s[s.Count / 2]) / 2;
        return s[Math.Clamp((int)Math.Ceiling(p * s.Count) - 1, 0, s.Count - 1)];
    }

    // ------------------------------------------------------------------ suites

    /// <summary>P4: kills of one node out of three, each followed by a fresh node, and torchrun's figures from the same run.</summary>
    public static (List<BenchFigure> Figures, bool Ok) Recovery(IReadOnlyList<string> configArgs, int kills, int torchrunReps, string? peer, string dir, TextWriter o)
    {
        o.WriteLine($"recovery: coordinator + 3 node processes, {kills} SIGKILLs of a node at random times, a fresh node after each (logs in {dir}) ...");
        var plan = new KillPlan(Nodes: 3, Kills: kills, Steps: 1_000_000, OpenEnded: true, WaitForJoin: true, MinGap: 3, MaxGap: 8,
            Timeout: TimeSpan.FromMinutes(5 + kills), Seed: Environment.TickCount);
        var r = RunKills(plan, BaseArgs(configArgs), dir, o);
        var done = r.Kills.Where(k => k.Lost is not null).ToList();
        if (r.Problem is not null) o.WriteLine($"  PROBLEM: {r.Problem} (logs in {dir})");
        o.WriteLine($"  {done.Count}/{r.Kills.Count} kills handled over {r.Metrics.LastStep} steps (coordinator phase at detection: {Phases(r.Kills)}); coordinator exit {r.CoordinatorExit} after SIGTERM");
        var figures = new List<BenchFigure>();
        if (done.Count == 0) return (figures, false);
        double median = Median(done.Select(k => k.Total)), p95 = Percentile(done.Select(k => k.Total), 0.95);
        var steps = r.Metrics.Steps.Select(s => s.Seconds).ToList();

        var agent = TorchrunPeer.Run(peer, "agent", torchrunReps, Path.Combine(dir, "torchrun-agent.log"), o);
        var worker = TorchrunPeer.Run(peer, "worker", torchrunReps, Path.Combine(dir, "torchrun-worker.log"), o);
        string agentName = $"torchrun tuned, node lost ({agent.Seconds.Count})", workerName = $"torchrun tuned, worker lost ({worker.Seconds.Count})";
        double? agentMedian = agent.Seconds.Count > 0 ? Median(agent.Seconds) : null, workerMedian = worker.Seconds.Count > 0 ? Median(worker.Seconds) : null;
        figures.Add(new($"P4 kill -> next step, median ({done.Count})", median, "s", agentMedian is null ? null : agentName, agentMedian));
        figures.Add(new($"P4 kill -> next step, p95 ({done.Count})", p95, "s", agentMedian is null ? null : agentName, agentMedian));
        if (workerMedian is not null)
            figures.Add(new("P4 kill -> next step, median", median, "s", workerName, workerMedian));
        void Part(string name, Func<Kill, double> f)
        {
            figures.Add(new($"  {name}, median", Median(done.Select(f)) * 1000, "ms", "median step, same run", Median(steps) * 1000));
            figures.Add(new($"  {name}, p95", Percentile(done.Select(f), 0.95) * 1000, "ms", "median step, same run", Median(steps) * 1000));
        }
        Part("detection", k => k.Detection);
        Part("re-plan", k => k.Lost!.ReplanSeconds);
        Part("unit install", k => k.Lost!.InstallSeconds);
        Part("redone step", k => k.Lost!.RedoSeconds);
        o.WriteLine(string.Create(CultureInfo.InvariantCulture, $"  kill -> next committed step: median {median:F2} s, p95 {p95:F2} s, max {done.Max(k => k.Total):F2} s (target p95 <= 3 s: {(p95 <= 3 ? "met" : "NOT met")})"));
        if (agentMedian is { } a)
            o.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"  torchrun tuned, node lost: median {a:F2} s -> ours is {a / median:F1}x faster (median), {a / p95:F1}x (our p95) (target >= 5x: {(a / p95 >= 5 ? "met" : a / median >= 5 ? "met on the median" : "NOT met")})"));
        if (workerMedian is { } w)
            o.WriteLine(string.Create(CultureInfo.InvariantCulture, $"  torchrun tuned, worker process lost: median {w:F2} s -> ours (a whole node) is {w / median:F1}x faster"));
        return (figures, r.Problem is null && done.Count == r.Kills.Count);
    }

    /// <summary>Tokens/s of fault-free 3-node runs with <c>cluster.redundancy</c> 1 and 0, alternating, each in fresh processes.</summary>
    public static (List<BenchFigure> Figures, bool Ok) Redundancy(IReadOnlyList<string> configArgs, int rounds, int timedSteps, string dir, TextWriter o)
    {
        const int warmup = 10;
        o.WriteLine($"redundancy: coordinator + 3 node processes, fault-free, {warmup}+{timedSteps} steps, cluster.redundancy 1 vs 0, {rounds} alternating rounds (logs in {dir}) ...");
        var perRound = new List<(double On, double Off, double OnSteps, double OffSteps)>();
        for (int round = 0; round < rounds; round++)
        {
            var rates = new Dictionary<int, (double Wall, double Steps)>();
            foreach (int red in round % 2 == 0 ? new[] { 1, 0 } : [0, 1])
            {
                var args = BaseArgs(configArgs).Concat(["--set", $"cluster.redundancy={red}"]).ToList();
                var plan = new KillPlan(3, 0, warmup + timedSteps + 1, false, false, 0, 0, TimeSpan.FromMinutes(10), 0);
                var r = RunKills(plan, args, Path.Combine(dir, $"round{round + 1}-redundancy{red}"), TextWriter.Null);
                if (r.Problem is not null || r.CoordinatorExit != 0)
                {
                    o.WriteLine($"  round {round + 1}, redundancy {red}: failed ({r.Problem ?? $"exit {r.CoordinatorExit}"})");
                    return ([], false);
                }
                // Committed steps warmup+1 .. last-1 by the clock of this reader (the last step also validates).
                var s = r.Metrics.Steps;
                var timed = s.Where(x => x.Step > warmup && x.Step < s[^1].Step).ToList();
                double wall = timed.Sum(x => x.Tokens) / (timed[^1].SeenUnix - s.First(x => x.Step == warmup).SeenUnix);
                rates[red] = (wall, timed.Sum(x => x.Tokens) / timed.Sum(x => x.Seconds));
            }
            perRound.Add((rates[1].Wall, rates[0].Wall, rates[1].Steps, rates[0].Steps));
            o.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"  round {round + 1}: redundancy 1 {rates[1].Wall:F0} tok/s, 0 {rates[0].Wall:F0} tok/s (wall clock): ratio {rates[1].Wall / rates[0].Wall:F3}; step time only: {rates[1].Steps / rates[0].Steps:F3}"));
        }
        var med = BenchCommand.MedianRound(perRound, x => x.On / x.Off);
        double pooled = perRound.Sum(x => x.On) / perRound.Sum(x => x.Off);
        o.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"  redundancy 1 / 0 tokens/s: median round {med.On / med.Off:F3}, mean of all rounds {pooled:F3} (target >= 0.97: {(med.On / med.Off >= 0.97 ? "met" : "NOT met")})"));
        return ([new("tokens/s, redundancy = 1", med.On, "tok/s", "redundancy = 0", med.Off),
                 new("tokens/s, redundancy = 1 (steps)", BenchCommand.MedianRound(perRound, x => x.OnSteps / x.OffSteps).OnSteps, "tok/s", "redundancy = 0 (steps)", BenchCommand.MedianRound(perRound, x => x.OnSteps / x.OffSteps).OffSteps)], true);
    }
}

/// <summary>
/// The peer: <c>../shared/peers/torchrun-recovery</c> (PyTorch's torchrun on this machine, tuned for its
/// fastest recovery), run from the same benchmark so both sides share the box's state.
/// </summary>
internal static class TorchrunPeer
{
    /// <param name="Seconds">Kill → next step done by all ranks, per recovered repetition.</param>
    public sealed record Result(IReadOnlyList<double> Seconds, string? Summary);

    private static readonly Regex Rep = new(@"rep \d+ \[tuned\] recovered: first step \+[\d.]+ s, all ranks \+([\d.]+) s", RegexOptions.CultureInvariant);

    /// <summary>The script: <paramref name="given"/>, $ELASTICMOE_TORCHRUN_RECOVERY, or ../shared/peers/torchrun-recovery from here or from the repository.</summary>
    public static string? Locate(string? given)
    {
        if (given is not null) return File.Exists(given) ? Path.GetFullPath(given) : null;
        var candidates = new List<string?> { Environment.GetEnvironmentVariable("ELASTICMOE_TORCHRUN_RECOVERY"), Path.Combine("..", "shared", "peers", "torchrun-recovery") };
        for (var d = new DirectoryInfo(AppContext.BaseDirectory); d is not null; d = d.Parent)
            if (File.Exists(Path.Combine(d.FullName, "ElasticMoE.sln")))
                candidates.Add(Path.Combine(d.FullName, "..", "shared", "peers", "torchrun-recovery"));
        return candidates.OfType<string>().Where(File.Exists).Select(Path.GetFullPath).FirstOrDefault();
    }

    /// <summary>Runs <c>torchrun-recovery --mode MODE -n REPS --config tuned</c>; an empty result (with the reason printed) when torch is missing.</summary>
    public static Result Run(string? given, string mode, int reps, string log, TextWriter o)
    {
        if (reps <= 0) return new([], null);
        var script = Locate(given);
        if (script is null)
        {
            o.WriteLine($"  torchrun ({mode}): SKIPPED: torchrun-recovery not found ({given ?? "../shared/peers/torchrun-recovery"}; --peer PATH or $ELASTICMOE_TORCHRUN_RECOVERY)");
            return new([], null);
        }
        var python = Environment.GetEnvironmentVariable("PYTHON") ?? "/usr/bin/python3";
        if (!Succeeds(python, "-c", "import torch"))
        {
            o.WriteLine($"  torchrun ({mode}): SKIPPED: {python} cannot import torch (apt-get install -y python3-torch python3-numpy)");
            return new([], null);
        }
        o.WriteLine($"  torchrun ({mode}): {script} --mode {mode} -n {reps} --config tuned ...");
        var psi = new ProcessStartInfo(script) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in new[] { "--mode", mode, "-n", reps.ToString(CultureInfo.InvariantCulture), "--config", "tuned" }) psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        var err = p.StandardError.ReadToEndAsync();
        var text = p.StandardOutput.ReadToEnd();
        p.WaitForExit();
        File.WriteAllText(log, text + err.Result);
        var seconds = text.Split('\n').Select(l => Rep.Match(l)).Where(m => m.Success).Select(m => double.Parse(m.Groups[1].Value, CultureInfo.InvariantCulture)).ToList();
        var summary = text.Split('\n', StringSplitOptions.RemoveEmptyEntries).LastOrDefault(l => l.StartsWith("torchrun recovery", StringComparison.Ordinal));
        o.WriteLine($"    {summary ?? $"no summary (exit {p.ExitCode}); see {log}"}");
        return new(seconds, summary);
    }

    private static bool Succeeds(string exe, params string[] args)
    {
        try
        {
            var psi = new ProcessStartInfo(exe) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
            foreach (var a in args) psi.ArgumentList.Add(a);
            using var p = Process.Start(psi)!;
            _ = p.StandardError.ReadToEndAsync();
            p.StandardOutput.ReadToEnd();
            return p.WaitForExit(120_000) && p.ExitCode == 0;
        }
        catch (System.ComponentModel.Win32Exception)
        {
            return false;
        }
    }
}
