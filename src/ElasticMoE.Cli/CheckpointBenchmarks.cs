using System.Diagnostics;
using System.Globalization;
using System.Text.RegularExpressions;
using ElasticMoE.Benchmarks;
using ElasticMoE.Configuration;
using ElasticMoE.Model;
using ElasticMoE.State;

namespace ElasticMoE.Cli;

/// <summary>
/// P5: what asynchronous cluster checkpoints cost. A coordinator and 3 <c>elasticmoe node</c> processes
/// (<see cref="ProcessCluster"/>) train the configured model three ways, alternating per round, each in
/// fresh processes: without <c>--run-dir</c> (the baseline), with <c>--run-dir</c> and
/// <c>checkpoint.every=0</c> (the journal alone, one checkpoint at the end) and with <c>--run-dir</c> and
/// <c>checkpoint.every=K</c> (default 10). From the checkpointing runs' coordinator logs: the stall per
/// checkpoint ("training paused"), the background write rate (MiB / "written in"), and which steps
/// started while a write was in flight; from the metrics: tokens/s of those steps and of the others.
/// </summary>
internal static class CheckpointBenchmarks
{
    private enum Mode { Baseline, Journal, Checkpoints }

    /// <summary>"checkpoint of step 40 committed: 3 shard(s), 12.3 MiB, training paused 4 ms, written in 0.21 s".</summary>
    private static readonly Regex Committed = new(
        @"checkpoint of step (\d+) committed: (\d+) shard\(s\), ([\d.]+) MiB, training paused (\d+) ms, written in ([\d.]+) s", RegexOptions.CultureInvariant);
    private static readonly Regex StepLine = new(@"^step\s+(\d+)/\d+\s", RegexOptions.CultureInvariant);
    private static readonly Regex Skipped = new(@"checkpoint of step (\d+) (skipped|abandoned|not started)", RegexOptions.CultureInvariant);

    public sealed record CheckpointLine(long Step, int Shards, double MiB, double StallMs, double WrittenSeconds)
    {
        public double MiBps => MiB / WrittenSeconds;
    }

    /// <summary>One run: its metrics, and for checkpointing runs what its coordinator log says.</summary>
    private sealed record Run(Mode Mode, string Dir, string? RunDir, MetricsTail Metrics, List<CheckpointLine> Checkpoints, HashSet<long> DuringWrite, List<string> NotWritten)
    {
        /// <summary>Timed steps: after the warm-up, before the last (which validates and waits for the final checkpoint).</summary>
        public List<MetricsTail.StepLine> Timed(int warmup) => Metrics.Steps.Where(s => s.Step > warmup && s.Step < Metrics.Steps[^1].Step).ToList();

        /// <summary>Tokens over the wall clock between committed steps (stalls included: the lines are written after them).</summary>
        public double WallTokensPerSecond(int warmup)
        {
            var t = Timed(warmup);
            return t.Sum(x => x.Tokens) / (t[^1].SeenUnix - Metrics.Steps.First(x => x.Step == warmup).SeenUnix);
        }

        /// <summary>Tokens over the steps' own seconds (stalls at boundaries excluded).</summary>
        public double StepTokensPerSecond(int warmup) => TokensPerSecond(Timed(warmup));
    }

    private static double TokensPerSecond(IReadOnlyCollection<MetricsTail.StepLine> steps) => steps.Sum(x => x.Tokens) / steps.Sum(x => x.Seconds);

    private sealed class BenchStop(string message) : Exception(message);

    public static (List<BenchFigure> Figures, bool Ok) Checkpoint(ElasticMoEConfig config, IReadOnlyList<string> configArgs, int rounds, int steps, string dir, TextWriter o)
    {
        const int warmup = 10;
        // checkpoint.every=10 unless the user's --set says otherwise (theirs come later and win).
        var ckptArgs = RecoveryBenchmarks.BaseArgs(new[] { "--set", "checkpoint.every=10" }.Concat(configArgs).ToList());
        string every = ckptArgs.Where(a => a.StartsWith("checkpoint.every=", StringComparison.Ordinal)).Last()["checkpoint.every=".Length..];
        o.WriteLine($"checkpoint: coordinator + 3 node processes, {steps} steps, no --run-dir vs --run-dir with checkpoint.every=0 (journal only) " +
                    $"vs checkpoint.every={every}, {rounds} rotating rounds, each run in fresh processes (logs in {dir}) ...");
        var perRound = new List<Dictionary<Mode, Run>>();
        var problems = new List<string>();
        var verify = new List<(string RunDir, int Exit, string Last)>();
        for (int round = 0; round < rounds; round++)
        {
            var runs = new Dictionary<Mode, Run>();
            var modes = Enum.GetValues<Mode>();
            foreach (var mode in modes.Skip(round % modes.Length).Concat(modes.Take(round % modes.Length)))
            {
                var args = mode switch
                {
                    Mode.Baseline => RecoveryBenchmarks.BaseArgs(configArgs),
                    Mode.Journal => ckptArgs.Concat(["--set", "checkpoint.every=0", "--set", "checkpoint.every-seconds=0"]).ToList(),
                    _ => ckptArgs,
                };
                var runDir = Path.Combine(dir, $"round{round + 1}-{mode.ToString().ToLowerInvariant()}");
                var r = RunOnce(mode, args, steps, runDir, TimeSpan.FromMinutes(10), out var problem);
                if (problem is not null)
                {
                    o.WriteLine($"  round {round + 1}, {mode}: failed ({problem}; logs in {runDir})");
                    return ([], false);
                }
                runs[mode] = r!;
                if (r!.NotWritten.Count > 0) problems.Add($"round {round + 1}, {mode}: {string.Join("; ", r.NotWritten)}");
                if (r.RunDir is { } rd)
                {
                    var (exit, last) = Verify(rd, Path.Combine(runDir, "verify.log"));
                    verify.Add((rd, exit, last));
                    if (exit != 0) problems.Add($"checkpoints verify --run-dir {rd} exited {exit}: {last}");
                }
            }
            perRound.Add(runs);
            var c = runs[Mode.Checkpoints];
            o.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"  round {round + 1}: tok/s (wall) baseline {runs[Mode.Baseline].WallTokensPerSecond(warmup):F0}, journal {runs[Mode.Journal].WallTokensPerSecond(warmup):F0}, " +
                $"checkpoints {c.WallTokensPerSecond(warmup):F0} (ratio {c.WallTokensPerSecond(warmup) / runs[Mode.Baseline].WallTokensPerSecond(warmup):F3}); " +
                $"{c.Checkpoints.Count} checkpoints, stall median {RecoveryBenchmarks.Median(c.Checkpoints.Select(x => x.StallMs)):F0} ms, max {c.Checkpoints.Max(x => x.StallMs):F0} ms, " +
                $"median step {RecoveryBenchmarks.Median(c.Timed(warmup).Select(s => s.Seconds)) * 1000:F0} ms; {c.DuringWrite.Count} steps started during a write"));
        }

        // Pooled over every checkpointing run.
        var ckptRuns = perRound.Select(r => r[Mode.Checkpoints]).ToList();
        var lines = ckptRuns.SelectMany(r => r.Checkpoints).ToList();
        var timed = ckptRuns.SelectMany(r => r.Timed(warmup).Select(s => (Run: r, Step: s))).ToList();
        double medianStepMs = RecoveryBenchmarks.Median(timed.Select(x => x.Step.Seconds)) * 1000;
        var during = timed.Where(x => x.Run.DuringWrite.Contains(x.Step.Step)).Select(x => x.Step).ToList();
        var without = timed.Where(x => !x.Run.DuringWrite.Contains(x.Step.Step)).Select(x => x.Step).ToList();
        double stallMedian = RecoveryBenchmarks.Median(lines.Select(x => x.StallMs)), stallMax = lines.Count > 0 ? lines.Max(x => x.StallMs) : double.NaN;
        double mibps = RecoveryBenchmarks.Median(lines.Select(x => x.MiBps));
        double mib = RecoveryBenchmarks.Median(lines.Select(x => x.MiB));
        double diskMiBps = DiskWriteMiBps(dir, mib);
        var (copyMs, copyMiB) = HostCopyMs(config);
        var wall = BenchCommand.MedianRound(perRound, r => r[Mode.Checkpoints].WallTokensPerSecond(warmup) / r[Mode.Baseline].WallTokensPerSecond(warmup));
        var stepTime = BenchCommand.MedianRound(perRound, r => r[Mode.Checkpoints].StepTokensPerSecond(warmup) / r[Mode.Baseline].StepTokensPerSecond(warmup));
        var journal = BenchCommand.MedianRound(perRound, r => r[Mode.Journal].WallTokensPerSecond(warmup) / r[Mode.Baseline].WallTokensPerSecond(warmup));
        var duringWriteSeconds = lines.Select(x => x.WrittenSeconds).ToList();

        o.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"  {lines.Count} checkpoints committed ({mib:F1} MiB, {lines[0].Shards} shards each): training paused median {stallMedian:F0} ms, max {stallMax:F0} ms " +
            $"= {stallMedian / medianStepMs:P2} / {stallMax / medianStepMs:P2} of the median step ({medianStepMs:F0} ms) (target <= 1 %: {(stallMedian / medianStepMs <= 0.01 ? "met" : "NOT met")}{(stallMax / medianStepMs <= 0.01 ? "" : stallMedian / medianStepMs <= 0.01 ? ", not by the max" : "")})"));
        o.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"  for scale: StateUnit.CopyToHost of every unit of a fresh model in this process ({copyMiB:F1} MiB of parameters, no moments yet: about one writer's share) takes {copyMs:F1} ms (median of 5)"));
        o.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"  written in median {RecoveryBenchmarks.Median(duringWriteSeconds):F2} s, max {duringWriteSeconds.Max():F2} s: {mibps:F1} MiB/s (median; a fsync'd {mib:F1} MiB file on the same disk: {diskMiBps:F1} MiB/s)"));
        o.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"  steps started while a write was in flight: {during.Count} at {TokensPerSecond(during):F0} tok/s vs {without.Count} others at {TokensPerSecond(without):F0} tok/s (ratio {TokensPerSecond(during) / TokensPerSecond(without):F3}; step seconds, same runs)"));
        o.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"  tokens/s with checkpoint.every={every} / without --run-dir: median round {wall[Mode.Checkpoints].WallTokensPerSecond(warmup) / wall[Mode.Baseline].WallTokensPerSecond(warmup):F3} (wall clock), " +
            $"{stepTime[Mode.Checkpoints].StepTokensPerSecond(warmup) / stepTime[Mode.Baseline].StepTokensPerSecond(warmup):F3} (step time); journal only / without: {journal[Mode.Journal].WallTokensPerSecond(warmup) / journal[Mode.Baseline].WallTokensPerSecond(warmup):F3}"));
        o.WriteLine($"  checkpoints verify: {string.Join(", ", verify.Select(v => $"exit {v.Exit}"))} ({verify.Count} run directories)");
        if (problems.Count > 0) o.WriteLine($"  PROBLEMS: {string.Join("; ", problems)}");

        var figures = new List<BenchFigure>
        {
            new($"P5 checkpoint stall, median ({lines.Count})", stallMedian, "ms", "median step, same runs", medianStepMs),
            new($"P5 checkpoint stall, max ({lines.Count})", stallMax, "ms", "median step, same runs", medianStepMs),
            new("  host copy, one writer's share", copyMs, "ms", "stall, median", stallMedian),
            new("checkpoint write rate, median", mibps, "MiB/s", "fsync'd file, same disk", diskMiBps),
            new("tokens/s, steps during a write", TokensPerSecond(during), "tok/s", "steps without a write", TokensPerSecond(without)),
            new($"tokens/s, checkpoint.every={every}", wall[Mode.Checkpoints].WallTokensPerSecond(warmup), "tok/s", "no --run-dir (median round)", wall[Mode.Baseline].WallTokensPerSecond(warmup)),
            new($"tokens/s, every={every} (steps)", stepTime[Mode.Checkpoints].StepTokensPerSecond(warmup), "tok/s", "no --run-dir (steps)", stepTime[Mode.Baseline].StepTokensPerSecond(warmup)),
            new("tokens/s, journal only", journal[Mode.Journal].WallTokensPerSecond(warmup), "tok/s", "no --run-dir (median round)", journal[Mode.Baseline].WallTokensPerSecond(warmup)),
        };
        return (figures, problems.Count == 0);
    }

    /// <summary>One fault-free run of a coordinator and 3 nodes to the end; null and a reason when it fails.</summary>
    private static Run? RunOnce(Mode mode, IReadOnlyList<string> args, int steps, string dir, TimeSpan timeout, out string? problem)
    {
        problem = null;
        if (Directory.Exists(dir)) Directory.Delete(dir, recursive: true);
        string? runDir = mode == Mode.Baseline ? null : Path.Combine(dir, "run");
        using var cluster = new ProcessCluster(dir, args);
        var m = cluster.Metrics;
        try
        {
            var coordinator = cluster.StartCoordinator(3, steps, runDir is null ? null : ["--run-dir", runDir]);
            for (int i = 0; i < 3; i++) cluster.StartNode();
            var overall = Stopwatch.StartNew();
            var progress = Stopwatch.StartNew();
            long seen = 0;
            while (coordinator.Alive)
            {
                m.Poll();
                if (m.LastStep != seen) { seen = m.LastStep; progress.Restart(); }
                if (progress.Elapsed > TimeSpan.FromSeconds(60)) throw new BenchStop($"HANG: no step committed for 60 s after step {m.LastStep}");
                if (overall.Elapsed > timeout) throw new BenchStop($"overall timeout ({timeout.TotalSeconds:F0} s) after step {m.LastStep}");
                Thread.Sleep(5);
            }
            coordinator.Process.WaitForExit();
            m.Poll();
            if (coordinator.Process.ExitCode != 0) throw new BenchStop($"coordinator exit {coordinator.Process.ExitCode} after step {m.LastStep}");
            if (m.LastStep != steps) throw new BenchStop($"the run ended at step {m.LastStep} of {steps}");
        }
        catch (BenchStop ex)
        {
            problem = ex.Message;
        }
        catch (Exception ex) when (ex is InvalidOperationException or TimeoutException)
        {
            problem = ex.Message;
        }
        cluster.StopAll(TimeSpan.FromSeconds(problem is null ? 15 : 0));
        if (problem is not null) return null;
        var (checkpoints, duringWrite, notWritten) = ReadCoordinatorLog(cluster.Coordinator!.Log);
        if (mode == Mode.Checkpoints && checkpoints.Count == 0) { problem = "no checkpoint committed"; return null; }
        return new Run(mode, dir, runDir, m, checkpoints, duringWrite, notWritten);
    }

    /// <summary>
    /// The committed checkpoints and the steps that started while one was being written. Steps start right
    /// after the previous step's line is printed, and a checkpoint's write begins at its step's boundary (the
    /// step's line comes after the copy to host), so step s is "during a write" when a checkpoint was begun
    /// at or before step s−1's line and its commit line had not been printed by then. The log gives the order,
    /// not times: a commit printed just after step s−1's line (while s is already running) still counts s.
    /// </summary>
    public static (List<CheckpointLine> Checkpoints, HashSet<long> DuringWrite, List<string> NotWritten) ReadCoordinatorLog(string log)
    {
        var text = File.ReadAllLines(log);
        var checkpoints = new List<CheckpointLine>();
        var notWritten = new List<string>();
        foreach (var line in text)
        {
            if (Committed.Match(line) is { Success: true } c)
                checkpoints.Add(new(long.Parse(c.Groups[1].Value, CultureInfo.InvariantCulture), int.Parse(c.Groups[2].Value, CultureInfo.InvariantCulture),
                    double.Parse(c.Groups[3].Value, CultureInfo.InvariantCulture), double.Parse(c.Groups[4].Value, CultureInfo.InvariantCulture),
                    double.Parse(c.Groups[5].Value, CultureInfo.InvariantCulture)));
            else if (Skipped.IsMatch(line)) notWritten.Add(line.Trim());
        }
        var begun = checkpoints.Select(c => c.Step).ToHashSet();
        var during = new HashSet<long>();
        bool open = false, nextDuring = false;
        foreach (var line in text)
        {
            if (StepLine.Match(line) is { Success: true } s)
            {
                long step = long.Parse(s.Groups[1].Value, CultureInfo.InvariantCulture);
                if (nextDuring) during.Add(step);
                if (begun.Contains(step)) open = true;
                nextDuring = open;
            }
            else if (Committed.IsMatch(line)) open = false;
        }
        return (checkpoints, during, notWritten);
    }

    /// <summary>`elasticmoe checkpoints verify --run-dir DIR`: its exit code and last line of output.</summary>
    private static (int Exit, string Last) Verify(string runDir, string log)
    {
        var child = ProcessCluster.Launch("verify", log, ["checkpoints", "verify", "--run-dir", runDir]);
        using (child.Process)
        {
            if (!child.Process.WaitForExit(TimeSpan.FromMinutes(2))) ProcessCluster.Kill(child);
            child.Process.WaitForExit();
            var last = File.ReadAllLines(log).LastOrDefault(l => l.Trim().Length > 0) ?? "";
            return (child.Process.ExitCode, last.Trim());
        }
    }

    /// <summary>
    /// The copy alone, without messages or a busy box's scheduling: <see cref="StateUnit.CopyToHost"/> of every
    /// unit of a fresh model of <paramref name="config"/> (parameters and buffers; moments do not exist before
    /// a first update, so this is a third of a checkpoint, about what each of 3 writers copies). Median of 5.
    /// </summary>
    private static (double Ms, double MiB) HostCopyMs(ElasticMoEConfig config)
    {
        using var model = new MoETransformer(config.Model, config.Seed, TorchSharp.torch.CPU);
        var units = UnitBinding.Bind(model);
        try
        {
            var times = new List<double>();
            long bytes = 0;
            for (int rep = 0; rep < 5; rep++)
            {
                var sw = Stopwatch.StartNew();
                bytes = units.Values.Sum(u => u.CopyToHost().Sum(t => (long)t.Data.Length));
                times.Add(sw.Elapsed.TotalMilliseconds);
            }
            return (RecoveryBenchmarks.Median(times), bytes / 1048576.0);
        }
        finally
        {
            foreach (var u in units.Values) u.Dispose();
        }
    }

    /// <summary>The baseline for the write rate: <paramref name="mib"/> MiB written and fsync'd as one file in <paramref name="dir"/>, median of 3.</summary>
    private static double DiskWriteMiBps(string dir, double mib)
    {
        if (!double.IsFinite(mib) || mib <= 0) return double.NaN;
        var path = Path.Combine(dir, "disk-write-probe.bin");
        var buffer = new byte[1 << 20];
        new Random(1).NextBytes(buffer);
        long bytes = (long)(mib * 1048576);
        var rates = new List<double>();
        for (int rep = 0; rep < 3; rep++)
        {
            var sw = Stopwatch.StartNew();
            using (var f = new FileStream(path, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 16))
            {
                for (long left = bytes; left > 0; left -= buffer.Length) f.Write(buffer, 0, (int)Math.Min(left, buffer.Length));
                f.Flush(flushToDisk: true);
            }
            rates.Add(mib / sw.Elapsed.TotalSeconds);
            File.Delete(path);
        }
        return RecoveryBenchmarks.Median(rates);
    }
}
