using System.CommandLine;
using System.Globalization;
using System.Text.Json;
using ElasticMoE.Benchmarks;
using ElasticMoE.Configuration;
using ElasticMoE.Data;
using ElasticMoE.Runtime.Benchmarks;

namespace ElasticMoE.Cli;

/// <summary>
/// <c>elasticmoe bench</c>: throughput and efficiency figures, each as a ratio against a baseline measured
/// in the same run on the same machine, never against a number remembered from elsewhere.
/// </summary>
public static class BenchCommand
{
    public static readonly string[] Suites = ["train", "moe", "moe-race", "mla-race", "leak", "cluster", "dataplane", "replan", "redundancy", "recovery", "chaos", "checkpoint", "placement", "shell", "rebalance", "canonical", "hosts", "trace", "planners", "data", "mirrors"];

    /// <summary>What runs without --suite: all but chaos (minutes of kills), canonical (tens of minutes of training: checks
    /// rather than figures), moe-race and mla-race (minutes of training), hosts (needs root and network namespaces), trace
    /// (minutes of a replayed availability trace), planners (a minute of pure planning at up to 1,024 workers), data
    /// (GiB of disk and minutes of preparing and training) and mirrors (nine runs of five processes).</summary>
    public static readonly string[] DefaultSuites = Suites.Where(s => s is not ("chaos" or "moe-race" or "mla-race" or "canonical" or "hosts" or "trace" or "planners" or "data" or "mirrors")).ToArray();

    public static Command Create(TextWriter console, TextWriter stderr)
    {
        var cfg = new RunConfigOptions();
        var suite = new Option<string[]>("--suite") { Description = $"which figures: {string.Join(", ", Suites)} (default: all)", AllowMultipleArgumentsPerToken = true };
        suite.AcceptOnlyFromAmong(Suites);
        var json = new Option<string?>("--json") { Description = "also write the figures to this JSON file" };
        var benchSteps = RunConfigOptions.Positive("--bench-steps", "timed steps for throughput figures (default 30)");
        var rounds = RunConfigOptions.Positive("--rounds", "cluster / redundancy / checkpoint / moe suites: interleaved rounds of all modes (all but moe: each mode in fresh processes; default 5 / 4 / 3 / 3)");
        var raceSeconds = RunConfigOptions.Positive("--race-seconds", "moe-race and mla-race suites: training seconds each model gets (default 240)");
        var kills = RunConfigOptions.Positive("--kills", "recovery suite: SIGKILLs of a node; hosts suite: link cuts, and as many SIGKILLs (default 10)");
        var events = RunConfigOptions.Positive("--events", "chaos suite: random events, kills with and without a replacement, joins and re-layouts (default 20; --steps sets the run: chaos default 300, checkpoint 150, canonical 1000)");
        var torchrunReps = RunConfigOptions.NonNegative("--torchrun-reps", "recovery suite: repetitions of each torchrun-recovery mode (default 3; 0 = skip torchrun)");
        var peer = new Option<string?>("--peer") { Description = "recovery suite: the torchrun-recovery script (default ../shared/peers/torchrun-recovery)" };
        var logs = new Option<string?>("--logs") { Description = "recovery, chaos, redundancy, checkpoint suites: folder for the processes' logs (default a new folder under /tmp)" };
        var trace = new Option<string?>("--trace") { Description = $"trace suite: an availability trace, Bamboo/Oobleck CSV 'milliseconds,add|remove,nodeNAME' (default {DefaultTrace})" };
        var speed = new Option<double?>("--speed") { Description = "trace suite: time compression of the trace (default 1)" };
        speed.Validators.Add(r => { if (r.GetValueOrDefault<double?>() is { } v && !(v > 0)) r.AddError($"--speed must be positive, got {v}"); });
        var maxNodes = RunConfigOptions.Positive("--max-nodes", "trace suite: node processes at the trace's peak (default 4)");
        var notice = new Option<double?>("--notice") { Description = "trace suite: probability that a removal is a 5 s preemption notice rather than a SIGKILL (default 0.5)" };
        notice.Validators.Add(r => { if (r.GetValueOrDefault<double?>() is { } v && !(v is >= 0 and <= 1)) r.AddError($"--notice is a probability in [0, 1], got {v}"); });
        var corpusGib = new Option<double>("--corpus-gib") { Description = "data suite: size of the generated corpus in GiB (default 2; --steps sets the training steps, default 1000)", DefaultValueFactory = _ => 2.0 };
        corpusGib.Validators.Add(r =>
        {
            try
            {
                if (r.GetValueOrDefault<double>() is not > 0) r.AddError("--corpus-gib must be positive");
            }
            catch (InvalidOperationException) { }
        });
        var measure = new Option<string?>("--measure") { Description = "internal: measure one cluster mode in this process", Hidden = true };
        measure.AcceptOnlyFromAmong(Enum.GetNames<ClusterBenchmarks.Mode>());
        var cmd = new Command("bench", "measure tokens/s, MFU, tensor leaks (and, with a cluster, its overheads)");
        cfg.AddTo(cmd);
        cmd.Options.Add(suite);
        cmd.Options.Add(json);
        cmd.Options.Add(benchSteps);
        cmd.Options.Add(rounds);
        cmd.Options.Add(measure);
        foreach (var o in new Option[] { raceSeconds, kills, events, torchrunReps, peer, logs, trace, speed, maxNodes, notice, corpusGib }) cmd.Options.Add(o);
        cmd.SetAction(p => Program.Guard(stderr, () =>
        {
            var chosen = p.GetValue(suite) is { Length: > 0 } s ? s : DefaultSuites;
            var config = cfg.Build(p);
            var corpus = TextCorpus.Load(config);
            Training.TorchSetup.Configure(config);
            var figures = new List<BenchFigure>();
            int steps = p.GetValue(benchSteps) ?? 30;
            // Before anything else touches torch in this process: an OpenMP team left by another
            // benchmark on this thread would slow the cluster's compute threads (libgomp).
            if (p.GetValue(measure) is { } mode)
            {
                // A child of `bench --suite cluster`: measure one mode, print one machine-readable line.
                var m = ClusterBenchmarks.MeasureAsync(Enum.Parse<ClusterBenchmarks.Mode>(mode), config, corpus, steps).GetAwaiter().GetResult();
                console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"MEASURED {mode} {m.TokensPerSecond:R} {m.PageFaultsPerStep:R}"));
                return Program.ExitCodes.Ok;
            }
            // A bar over the suites on a terminal (each suite's lines above it), a line per suite elsewhere.
            using var suites = Progress.Start(console, "bench", chosen.Length, "suites");
            var stdout = suites.Writer;
            int started = 0;
            bool Suite(string name)
            {
                if (!chosen.Contains(name)) return false;
                suites.Label = $"bench ({name})";
                suites.Report(started++);
                return true;
            }
            if (Suite("train"))
            {
                stdout.WriteLine($"train: {steps} timed steps of the configured model on {corpus.Name}, {TorchSharp.torch.get_num_threads()} threads ...");
                var r = TrainingBenchmarks.Throughput(config, corpus, steps);
                figures.Add(new("tokens/s (single process)", r.TokensPerSecond, "tok/s"));
                figures.Add(new("model FLOP/s", r.ModelFlops, "FLOP/s", "fp32 GEMM peak 1024^3", r.GemmPeakFlops));
                figures.Add(new("MFU", r.Mfu, "fraction"));
            }
            if (Suite("moe"))
            {
                int n = p.GetValue(rounds) ?? 5;
                var dense = MoEBenchmarks.DenseEquivalent(config).Model;
                stdout.WriteLine($"moe: routed experts per layer, per-expert loop vs bmm kernels vs the chunked CPU kernel (forward + backward of one micro-batch's rows) ...");
                foreach (var t in MoEBenchmarks.ExpertTime(config, corpus))
                {
                    stdout.WriteLine(string.Create(CultureInfo.InvariantCulture,
                        $"  block {t.Layer}: {t.Rows} rows, largest expert {t.Capacity}: loop {t.LoopMs:F2} ms, one padded bmm {t.PaddedMs:F2} ms, grouped {t.GroupedMs:F2} ms (groups {t.Groups}), chunked {t.ChunkedMs:F2} ms"));
                    figures.Add(new($"routed experts, block {t.Layer} (chunked)", t.ChunkedMs, "ms", "per-expert loop", t.LoopMs));
                    figures.Add(new($"routed experts, block {t.Layer} (grouped)", t.GroupedMs, "ms", "per-expert loop", t.LoopMs));
                    figures.Add(new($"routed experts, block {t.Layer} (padded)", t.PaddedMs, "ms", "per-expert loop", t.LoopMs));
                }
                stdout.WriteLine($"moe: tokens/s of the MoE (default and loop experts) vs dense (dense-layers={dense.DenseLayers}, dense-hidden={dense.DenseHidden}), trained side by side in blocks of {MoEBenchmarks.Block} steps, {n} rounds of {steps} steps each ...");
                var perRound = MoEBenchmarks.Throughput(config, corpus, n, steps, log: stdout);
                const MoEBenchmarks.Mode moe = MoEBenchmarks.Mode.MoE, loop = MoEBenchmarks.Mode.MoELoop, dn = MoEBenchmarks.Mode.Dense;
                var g = MedianRound(perRound, r => r.TokensPerSecond[moe] / r.TokensPerSecond[dn]);
                var l = MedianRound(perRound, r => r.TokensPerSecond[loop] / r.TokensPerSecond[dn]);
                figures.Add(new("MoE tokens/s (default kernel)", g.TokensPerSecond[moe], "tok/s", "dense, equal active FFN", g.TokensPerSecond[dn]));
                figures.Add(new("MoE tokens/s (per-expert loop)", l.TokensPerSecond[loop], "tok/s", "dense, equal active FFN", l.TokensPerSecond[dn]));
            }
            if (Suite("moe-race"))
            {
                int seconds = p.GetValue(raceSeconds) ?? 240;
                var dense = MoEBenchmarks.DenseEquivalent(config).Model;
                stdout.WriteLine($"moe-race: the MoE and the dense model (dense-layers={dense.DenseLayers}, dense-hidden={dense.DenseHidden}) trained side by side on {corpus.Name}, " +
                                 $"blocks of {MoEBenchmarks.RaceBlock} steps in turn, {seconds} s of training each, {config.Train.Steps} scheduled steps, validation every {config.Train.EvalEvery} steps ...");
                var race = MoEBenchmarks.Race(config, corpus, seconds, stdout);
                PrintRace(stdout, race, seconds, "MoE", "dense");
                var (lastMoE, lastDense) = (race.First[^1], race.Second[^1]);
                figures.Add(new($"MoE validation loss after {seconds} s", lastMoE.ValidationLoss, "nats/byte", "dense, same training time", lastDense.ValidationLoss));
                figures.Add(new($"MoE steps in {seconds} s", lastMoE.Step, "steps", "dense, same training time", lastDense.Step));
            }
            if (Suite("mla-race"))
            {
                int seconds = p.GetValue(raceSeconds) ?? 240;
                var m = AttentionBenchmarks.With(config, AttentionKind.Mla).Model;
                stdout.WriteLine($"mla-race: the configured model with MLA (q-lora-rank={m.QLoraRank}, kv-lora-rank={m.KvLoraRank}, qk-nope-head-dim={m.QkNopeHeadDim}, " +
                                 $"qk-rope-head-dim={m.QkRopeHeadDim}, v-head-dim={m.VHeadDim}) and with MHA ({m.Heads} heads of {m.HeadDim}) trained side by side on {corpus.Name}, " +
                                 $"blocks of {MoEBenchmarks.RaceBlock} steps in turn, {seconds} s of training each, {config.Train.Steps} scheduled steps, validation every {config.Train.EvalEvery} steps ...");
                var race = AttentionBenchmarks.Race(config, corpus, seconds, stdout);
                PrintRace(stdout, new MoEBenchmarks.RaceResult(race.Mla.Curve, race.Mha.Curve), seconds, "MLA", "MHA");
                var (mla, mha) = (race.Mla, race.Mha);
                stdout.WriteLine($"  attention parameters per block: MLA {mla.AttentionParameters}, MHA {mha.AttentionParameters}");
                figures.Add(new($"MLA validation loss after {seconds} s", mla.Curve[^1].ValidationLoss, "nats/token", "MHA, same training time", mha.Curve[^1].ValidationLoss));
                if (race.CommonStep is { } common)
                    figures.Add(new($"MLA validation loss at step {common}", mla.LossAtStep(common)!.Value, "nats/token", "MHA, same step", mha.LossAtStep(common)!.Value));
                figures.Add(new("MLA tokens/s (median step of the race)", mla.TokensPerSecond, "tok/s", "MHA, same run", mha.TokensPerSecond));
                figures.Add(new($"MLA steps in {seconds} s", mla.Curve[^1].Step, "steps", "MHA, same training time", mha.Curve[^1].Step));
                figures.Add(new("MLA K/V cache elements per token and layer", mla.KvElementsPerToken, "elements", "MHA (2 x heads x head-dim)", mha.KvElementsPerToken));
            }
            if (Suite("leak"))
            {
                stdout.WriteLine("leak: live tensors across 200 training steps (with evaluations) ...");
                var small = config with { Model = config.Model with { DModel = 64, Layers = 2, Context = 32, DenseHidden = 96, MoE = config.Model.MoE with { ExpertHidden = 32 } } };
                var r = TrainingBenchmarks.TensorLeak(small, corpus, 200);
                figures.Add(new("live tensors after 200 steps", r.LiveAfter, "tensors", "live tensors before", r.LiveBefore));
                figures.Add(new("working set after 200 steps", r.ProcessBytesAfter / 1048576.0, "MiB", "working set before", r.ProcessBytesBefore / 1048576.0));
            }
            if (Suite("cluster"))
            {
                int n = p.GetValue(rounds) ?? 5;
                stdout.WriteLine($"cluster: {steps} timed steps each, single-process loop vs 1 node vs 2 nodes (loopback TCP), each in its own process, {n} interleaved rounds ...");
                // Throughput of a fresh process on a small shared VM wanders by ±10 % from one process to
                // the next, more than the overheads measured here. So each ratio is taken within a round
                // (modes run back to back), and the figure is the round with the median ratio.
                const ClusterBenchmarks.Mode single = ClusterBenchmarks.Mode.SingleProcess, one = ClusterBenchmarks.Mode.OneNode, two = ClusterBenchmarks.Mode.TwoNodes;
                var perRound = new List<Dictionary<ClusterBenchmarks.Mode, ClusterBenchmarks.Measurement>>();
                for (int round = 0; round < n; round++)
                {
                    var r = new Dictionary<ClusterBenchmarks.Mode, ClusterBenchmarks.Measurement>();
                    foreach (var m in Enum.GetValues<ClusterBenchmarks.Mode>())
                        r[m] = MeasureInChild(m, args: p.Tokens.Select(t => t.Value).ToArray(), stderr);
                    perRound.Add(r);
                    stdout.WriteLine(string.Create(CultureInfo.InvariantCulture,
                        $"  round {round + 1}: {string.Join(", ", r.Select(kv => $"{kv.Key} {kv.Value.TokensPerSecond:F0}"))} tok/s; P1 {r[one].TokensPerSecond / r[single].TokensPerSecond:F3}, P3 {r[two].TokensPerSecond / r[one].TokensPerSecond:F3}"));
                }
                var p1 = MedianRound(perRound, r => r[one].TokensPerSecond / r[single].TokensPerSecond);
                var p3 = MedianRound(perRound, r => r[two].TokensPerSecond / r[one].TokensPerSecond);
                var faults = MedianRound(perRound, r => r[one].PageFaultsPerStep / r[single].PageFaultsPerStep);
                figures.Add(new("P1 tokens/s, 1 node", p1[one].TokensPerSecond, "tok/s", "single-process loop", p1[single].TokensPerSecond));
                figures.Add(new("P3 tokens/s, 2 nodes", p3[two].TokensPerSecond, "tok/s", "1 node", p3[one].TokensPerSecond));
                figures.Add(new("page faults per step, 1 node", faults[one].PageFaultsPerStep, "faults", "single-process loop", faults[single].PageFaultsPerStep));
            }
            if (Suite("dataplane"))
            {
                stdout.WriteLine("dataplane: 1, 16 and 64 MiB tensors, data plane vs a raw loopback socket ...");
                foreach (var r in Runtime.DataPlane.DataPlaneBenchmark.RunAsync([1, 16, 64], 10).GetAwaiter().GetResult())
                    figures.Add(new($"P2 data plane {r.SizeMb} MiB", r.DataPlaneMBps, "MiB/s", "raw loopback TCP socket", r.RawSocketMBps));
            }
            if (Suite("replan"))
            {
                stdout.WriteLine($"replan: 3 in-process nodes, 70 steps, re-layouts {ReplanBenchmark.Schedule} ...");
                var r = ReplanBenchmark.Run(config, corpus, stdout);
                double medianPause = r.Plans.Select(p => p.PauseSeconds).Order().ElementAt(r.Plans.Count / 2);
                figures.Add(new("re-plan pause (median)", medianPause * 1000, "ms", "one step of the same run", r.MedianStepSeconds * 1000));
                figures.Add(new("re-plan pause (worst)", r.Plans.Max(p => p.PauseSeconds) * 1000, "ms", "one step of the same run", r.MedianStepSeconds * 1000));
                var moving = r.Plans.Where(p => p.UnitsMoved > 0).ToList();
                if (moving.Count > 0)
                    figures.Add(new("bytes moved per re-plan (mean)", moving.Average(p => p.BytesMoved) / 1024.0, "KiB", "state of the units moved", moving.Average(p => p.UnitBytes) / 1024.0));
                foreach (var (kind, bytes) in r.UnitBytesByKind.OrderBy(kv => kv.Key))
                    figures.Add(new($"unit size: {kind}", bytes / 1024.0, "KiB"));
            }
            if (Suite("placement"))
                figures.AddRange(Placement(stdout));
            if (Suite("planners"))
                figures.AddRange(PlannerBenchmarks.Run(stdout));
            if (Suite("rebalance"))
                figures.AddRange(RebalanceBenchmarks.Run(config, corpus, p.GetValue(cfg.Steps) ?? 60, stdout));
            if (Suite("data"))
                figures.AddRange(DataBenchmark.Run(config, p.GetValue(corpusGib), p.GetValue(cfg.Steps) ?? 1000, stdout));
            bool ok = true;
            if (Suite("canonical"))
            {
                int n = p.GetValue(cfg.Steps) ?? 1000;
                stdout.WriteLine($"canonical: {n} steps of the configured model, the single-process loop vs in-process clusters at " +
                                 $"{string.Join(", ", CanonicalBenchmark.Layouts.Select(l => $"DP {l.Nodes / l.Pp} x PP {l.Pp}"))}: every step's loss and gradient norm bit for bit ...");
                var results = CanonicalBenchmark.Run(config, corpus, n, stdout);
                foreach (var r in results)
                    figures.Add(new($"canonical {r.Layout}: bit-identical steps", r.IdenticalSteps, "steps", "steps run", n));
                bool same = results.All(r => r.IdenticalSteps == n && r.Steps == n);
                stdout.WriteLine(same ? "  canonical: PASS" : "  canonical: FAIL: some layout left the single-process loop's bits");
                ok &= same;
            }
            if (chosen.Intersect(["redundancy", "recovery", "chaos", "checkpoint", "shell", "hosts", "trace", "mirrors"]).Any())
            {
                // These run elasticmoe processes of their own: the config options go to every one of them.
                var childArgs = ConfigArgs(p.Tokens);
                var dir = p.GetValue(logs) ?? Path.Combine(Path.GetTempPath(), $"elasticmoe-bench-{DateTime.Now:yyyyMMdd-HHmmss}");
                if (Suite("redundancy"))
                {
                    var (f, good) = RecoveryBenchmarks.Redundancy(childArgs, p.GetValue(rounds) ?? 4, p.GetValue(benchSteps) ?? 50, Path.Combine(dir, "redundancy"), stdout);
                    figures.AddRange(f);
                    ok &= good;
                }
                if (Suite("mirrors"))
                {
                    var (f, good) = MirrorBenchmarks.Run(config, childArgs, p.GetValue(rounds) ?? 3, p.GetValue(benchSteps) ?? 40, Path.Combine(dir, "mirrors"), stdout);
                    figures.AddRange(f);
                    ok &= good;
                }
                if (Suite("recovery"))
                {
                    var (f, good) = RecoveryBenchmarks.Recovery(childArgs, p.GetValue(kills) ?? 10, p.GetValue(torchrunReps) ?? 3, p.GetValue(peer), Path.Combine(dir, "recovery"), stdout);
                    figures.AddRange(f);
                    ok &= good;
                }
                if (Suite("chaos"))
                {
                    var (f, good) = ChaosBenchmark.Run(childArgs, p.GetValue(events) ?? 20, p.GetValue(cfg.Steps) ?? 300, Path.Combine(dir, "chaos"), stdout);
                    figures.AddRange(f);
                    ok &= good;
                }
                if (Suite("trace"))
                {
                    var file = p.GetValue(trace) ?? FindDefaultTrace()
                               ?? throw new ElasticMoE.Configuration.ConfigException($"--trace: no trace given and {DefaultTrace} was not found above {Environment.CurrentDirectory}");
                    var (f, good) = TraceBenchmark.Run(childArgs, new TraceBenchmark.Options(file, p.GetValue(speed) ?? 1, p.GetValue(maxNodes) ?? 4,
                        p.GetValue(notice) ?? 0.5, p.GetValue(cfg.Steps) ?? 150), Path.Combine(dir, "trace"), stdout);
                    figures.AddRange(f);
                    ok &= good;
                }
                if (Suite("hosts"))
                {
                    var (f, good) = HostBenchmarks.SilentLoss(childArgs, p.GetValue(kills) ?? 10, Path.Combine(dir, "hosts"), stdout);
                    figures.AddRange(f);
                    ok &= good;
                    (f, good) = HostBenchmarks.Bandwidth(childArgs, 100, Path.Combine(dir, "hosts-bandwidth"), stdout);
                    figures.AddRange(f);
                    ok &= good;
                }
                if (Suite("shell"))
                {
                    var (f, good) = ShellBenchmarks.Latency(childArgs, p.GetValue(cfg.Steps) ?? 100000, Path.Combine(dir, "shell"), stdout);
                    figures.AddRange(f);
                    ok &= good;
                }
                if (Suite("checkpoint"))
                {
                    var (f, good) = CheckpointBenchmarks.Checkpoint(config, childArgs, p.GetValue(rounds) ?? 3, p.GetValue(cfg.Steps) ?? 150, Path.Combine(dir, "checkpoint"), stdout);
                    figures.AddRange(f);
                    ok &= good;
                }
            }
            suites.Done();
            Print(stdout, figures);
            if (p.GetValue(json) is { } path)
                File.WriteAllText(path, JsonSerializer.Serialize(figures.Select(f => new { f.Name, f.Value, f.Unit, f.Baseline, f.BaselineValue, f.Ratio }), new JsonSerializerOptions { WriteIndented = true }));
            return ok ? Program.ExitCodes.Ok : Program.ExitCodes.Failed;
        }));
        return cmd;
    }

    /// <summary>The synthetic trace shipped with the repository, for <c>--suite trace</c> without <c>--trace</c>.</summary>
    public const string DefaultTrace = "bench/traces/spot-synthetic.csv";

    private static string? FindDefaultTrace()
    {
        foreach (var start in new[] { Environment.CurrentDirectory, AppContext.BaseDirectory })
            for (var d = new DirectoryInfo(start); d is not null; d = d.Parent)
                if (File.Exists(Path.Combine(d.FullName, DefaultTrace))) return Path.Combine(d.FullName, DefaultTrace);
        return null;
    }

    /// <summary>P6: the expert placement planners alone (pure code: no model, no cluster), one table and its figures.</summary>
    private static IEnumerable<BenchFigure> Placement(TextWriter o)
    {
        var setup = new PlacementBenchmarks.Setup();
        o.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"placement: Zipf s={setup.ZipfS} loads, {setup.Layers} MoE layers x {setup.Experts} experts on {setup.Workers} workers, {setup.Slots} slots each " +
            $"({setup.RedundantSlots} redundant: {100.0 * setup.RedundantSlots * setup.Workers / setup.Experts:F0} % spare); then {setup.Rebalances} rebalances, " +
            $"loads drifting ±{100 * setup.Drift:F0} % between them; ours with churn-budget {setup.ChurnBudget} ..."));
        var result = PlacementBenchmarks.Run(setup);
        o.WriteLine($"  {"",-20} {"Zipf",9} | {"drift: max/mean",-30} | {"copies moved/rebalance",-22} | {"copies",6} {"planner",9}");
        o.WriteLine($"  {"policy",-20} {"max/mean",9} | {"kept",8} {"worst",8} {"before",12} | {"mean",10} {"worst",11} | {"",6} {"ms/rebal",9}");
        foreach (var r in result)
            o.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"  {r.Policy,-20} {r.ZipfMaxOverMean,9:F3} | {r.DriftMaxOverMean,8:F3} {r.DriftWorstMaxOverMean,8:F3} {r.DriftBeforeMaxOverMean,12:F3} | {100 * r.MovedFraction,9:F1}% {100 * r.MaxMovedFraction,10:F1}% | {r.Copies,6} {r.MsPerRebalance,9:F3}"));
        var start = PlacementBenchmarks.FromRoundRobin(setup, 5);
        var steps = string.Join(" -> ", start.Select(r => string.Create(CultureInfo.InvariantCulture, $"{r.MaxOverMeanAfter:F3} ({r.CopiesMoved})")));
        o.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"  ours from static round-robin on the Zipf loads, max/mean (copies moved) after each rebalance: {start[0].MaxOverMeanBefore:F3} -> {steps}"));
        var (static_, eplb, eplbHere, ours) = (result[0], result[1], result[2], result[3]);
        return
        [
            new("P6 max/mean, Zipf (ours)", ours.ZipfMaxOverMean, "ratio", "static round-robin", static_.ZipfMaxOverMean),
            new("P6 max/mean, Zipf (EPLB)", eplb.ZipfMaxOverMean, "ratio", "static round-robin", static_.ZipfMaxOverMean),
            new("P6 max/mean, Zipf (EPLB here)", eplbHere.ZipfMaxOverMean, "ratio", "static round-robin", static_.ZipfMaxOverMean),
            new("P6 max/mean kept, drift (ours)", ours.DriftMaxOverMean, "ratio", "EPLB", eplb.DriftMaxOverMean),
            new("P6 copies moved/rebalance (ours)", ours.MovedFraction, "fraction", "EPLB", eplb.MovedFraction),
            new("P6 most moved in one (ours)", ours.MaxMovedFraction, "fraction", "EPLB", eplb.MaxMovedFraction),
            new("P6 planner time (ours)", ours.MsPerRebalance, "ms", "EPLB", eplb.MsPerRebalance),
        ];
    }

    /// <summary>Both validation curves of a race at twelfths of its training time, side by side (the last row: where each stopped).</summary>
    private static void PrintRace(TextWriter stdout, MoEBenchmarks.RaceResult race, double seconds, string first, string second)
    {
        stdout.WriteLine($" train s  {first} step  {first} val  {second} step  {second} val");
        for (int k = 1; k <= 12; k++)
        {
            double at = seconds * k / 12.0;
            // The last row: where each stopped (its last step ends a little past the budget).
            var (a, b) = k == 12 ? (race.First[^1], race.Second[^1]) : (MoEBenchmarks.At(race.First, at), MoEBenchmarks.At(race.Second, at));
            if (a is null || b is null) continue;
            static string Col(IFormattable v, string format, int width) => v.ToString(format, CultureInfo.InvariantCulture).PadLeft(width);
            stdout.WriteLine($"  {Col(at, "F0", 6)}  {Col(a.Step, "D", 5 + first.Length)}  {Col(a.ValidationLoss, "F4", 4 + first.Length)}" +
                             $"  {Col(b.Step, "D", 5 + second.Length)}  {Col(b.ValidationLoss, "F4", 4 + second.Length)}");
        }
    }

    /// <summary>The round whose <paramref name="ratio"/> is the median (the lower one of an even count; NaN sorts first).</summary>
    public static T MedianRound<T>(IReadOnlyList<T> rounds, Func<T, double> ratio)
    {
        var sorted = rounds.OrderBy(ratio).ToList();
        return sorted[(sorted.Count - 1) / 2];
    }

    /// <summary>The options of this command line that define a run (config file, --set, seed, data, threads, device), for the processes a suite starts.</summary>
    public static List<string> ConfigArgs(IReadOnlyList<System.CommandLine.Parsing.Token> tokens)
    {
        string[] keep = ["--config", "-c", "--seed", "--data", "--threads", "--device", "--set"];
        var args = new List<string>();
        bool taking = false;
        foreach (var t in tokens)
        {
            if (t.Type == System.CommandLine.Parsing.TokenType.Option) taking = keep.Contains(t.Value);
            else if (t.Type != System.CommandLine.Parsing.TokenType.Argument) taking = false;
            if (taking) args.Add(t.Value);
        }
        return args;
    }

    // Runs this executable again with the same arguments plus --measure, so each mode has a process to itself.
    private static ClusterBenchmarks.Measurement MeasureInChild(ClusterBenchmarks.Mode mode, string[] args, TextWriter stderr)
    {
        var self = ProcessCluster.SelfCommand();
        var psi = new System.Diagnostics.ProcessStartInfo(self[0]) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in self.Skip(1)) psi.ArgumentList.Add(a);
        psi.ArgumentList.Add("bench");
        var skip = false;
        foreach (var a in args)
        {
            // Drop options that would recurse or write files twice.
            if (skip) { skip = false; continue; }
            if (a is "--suite" or "--json" or "--rounds") { skip = true; continue; }
            if (a == "bench" || BenchCommand.Suites.Contains(a)) continue;
            psi.ArgumentList.Add(a);
        }
        psi.ArgumentList.Add("--measure");
        psi.ArgumentList.Add(mode.ToString());
        using var child = System.Diagnostics.Process.Start(psi)!;
        var err = child.StandardError.ReadToEndAsync();
        var text = child.StandardOutput.ReadToEnd();
        child.WaitForExit();
        var line = text.Split('\n').FirstOrDefault(l => l.StartsWith("MEASURED ", StringComparison.Ordinal));
        if (child.ExitCode != 0 || line is null)
            throw new InvalidOperationException($"benchmark child for {mode} failed (exit {child.ExitCode}): {err.Result}");
        var parts = line.Split(' ');
        return new(double.Parse(parts[2], CultureInfo.InvariantCulture), double.Parse(parts[3], CultureInfo.InvariantCulture));
    }

    public static void Print(TextWriter o, IEnumerable<BenchFigure> figures)
    {
        o.WriteLine();
        o.WriteLine($"{"figure",-34} {"value",16} {"unit",-9} {"baseline (same run)",-28} {"baseline value",16} {"ratio",8}");
        foreach (var f in figures)
            o.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"{f.Name,-34} {Fmt(f.Value),16} {f.Unit,-9} {f.Baseline ?? "",-28} {(f.BaselineValue is { } b ? Fmt(b) : ""),16} {(f.Ratio is { } r ? r.ToString("F3", CultureInfo.InvariantCulture) : ""),8}"));
    }

    private static string Fmt(double v) => Math.Abs(v) >= 1e6 ? v.ToString("E3", CultureInfo.InvariantCulture) : v.ToString("F3", CultureInfo.InvariantCulture);
}
