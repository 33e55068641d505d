using System.CommandLine;
using System.Runtime.InteropServices;
using ElasticMoE.Configuration;
using ElasticMoE.Data;
using ElasticMoE.Training;
using ElasticMoE.Runtime.Hosting;
using ElasticMoE.Runtime.Observability;

namespace ElasticMoE.Cli;

/// <summary>The <c>elasticmoe</c> executable: one binary, sub-commands per role.</summary>
public static class Program
{
    /// <summary>Exit codes, so scripts can tell a usage error from a diverged run (listed in README, "Using it").</summary>
    public static class ExitCodes
    {
        public const int Ok = 0;
        public const int Usage = 1;            // System.CommandLine's own code for parse errors
        public const int BadInput = 2;         // config, data or checkpoint problems
        public const int Diverged = 3;         // NaN/Inf loss or gradient
        public const int Failed = 4;           // a distributed run stopped on an error (lost or departed node, worker failure, stuck step)
        public const int Refused = 5;          // node: the coordinator refused it (model config, seed, run already started)
        public const int CoordinatorLost = 6;  // node: its coordinator became unreachable or left before ending the run
        public const int RunStopped = 7;       // node: its coordinator stopped the run early on request
        // Stopped by a signal this process received: 128 + its number (130 SIGINT, 143 SIGTERM), the
        // status a shell shows for a process killed by that signal, so wrappers read it the same way.

        public static int ForSignal(PosixSignal signal) => 128 + signal switch
        {
            PosixSignal.SIGHUP => 1,
            PosixSignal.SIGINT => 2,
            PosixSignal.SIGQUIT => 3,
            PosixSignal.SIGTERM => 15,
            _ => throw new ArgumentOutOfRangeException(nameof(signal), signal, "not a stop signal"),
        };

        /// <summary>The one place an outcome becomes a process exit code.</summary>
        public static int For(RunOutcome outcome) => outcome switch
        {
            RunOutcome.Finished => Ok,
            RunOutcome.Stopped s => ForSignal(s.Signal),
            RunOutcome.RunStopped => RunStopped,
            RunOutcome.Diverged => Diverged,
            RunOutcome.Failed => Failed,
            RunOutcome.Refused => Refused,
            RunOutcome.CoordinatorLost => CoordinatorLost,
            _ => throw new ArgumentOutOfRangeException(nameof(outcome), outcome, "unknown outcome"),
        };
    }

    public static int Main(string[] args) => Run(args, Console.Out, Console.Error);

    public static int Run(string[] args, TextWriter stdout, TextWriter stderr)
    {
        var root = new RootCommand("ElasticMoE: elastic Mixture-of-Experts training on an actor cluster");
        root.Subcommands.Add(TrainCommand.Create(stdout, stderr));
        root.Subcommands.Add(NodeCommand.Create(stdout, stderr));
        root.Subcommands.Add(BenchCommand.Create(stdout, stderr));
        root.Subcommands.Add(CheckpointCommands.Create(stdout, stderr));
        root.Subcommands.Add(PlotCommand.Create(stdout, stderr));
        root.Subcommands.Add(InferenceCommands.Generate(stdout, stderr));
        root.Subcommands.Add(InferenceCommands.Eval(stdout, stderr));
        root.Subcommands.Add(DataCommands.Create(stdout, stderr));
        var shell = ShellCommand.Create(stdout, stderr);
        root.Subcommands.Add(shell);
        var parse = root.Parse(args);
        if (parse.Errors.Count > 0 && parse.CommandResult.Command == shell)
        {
            // The shell's codes are for scripts: 1 = a command failed, 2 = the shell could not be used.
            foreach (var e in parse.Errors) stderr.WriteLine($"error: {e.Message}");
            return ShellCommand.Unusable;
        }
        // No ProcessTerminationTimeout: our commands handle SIGINT/SIGTERM themselves (StopSignals).
        return parse.Invoke(new InvocationConfiguration { Output = stdout, Error = stderr, ProcessTerminationTimeout = null });
    }

    /// <summary>Runs <paramref name="body"/>, turning known failures into a message and an exit code.</summary>
    public static int Guard(TextWriter stderr, Func<int> body)
    {
        try
        {
            return body();
        }
        catch (Exception ex) when (ex is ConfigException or FileNotFoundException or InvalidDataException or Checkpointing.CheckpointCorruptException)
        {
            stderr.WriteLine($"error: {ex.Message}");
            return ExitCodes.BadInput;
        }
        catch (TrainingDivergedException ex)
        {
            return Report(stderr, new RunOutcome.Diverged(ex.Message));
        }
        catch (Runtime.Actors.TrainingFailedException ex)
        {
            // The kind, not the wording: a worker that saw a NaN reports FailureKind.Diverged.
            return Report(stderr, ex.Kind == Runtime.Protocol.FailureKind.Diverged ? new RunOutcome.Diverged(ex.Message) : new RunOutcome.Failed(ex.Message));
        }
    }

    /// <summary>
    /// Starts this process's Prometheus endpoint if <c>metrics.prometheus.port</c> is set (null otherwise) and
    /// says where it is; disposing it stops it.
    /// </summary>
    public static MetricsEndpoint? StartMetrics(ElasticMoEConfig config, TextWriter stdout)
    {
        var endpoint = MetricsEndpoint.Start(config.Prometheus);
        if (endpoint is not null) stdout.WriteLine($"metrics endpoint {endpoint.Url}");
        return endpoint;
    }

    /// <summary>Prints how a run ended (errors to stderr, the rest to stdout) and returns its exit code.</summary>
    public static int Report(TextWriter output, RunOutcome outcome)
    {
        output.WriteLine(outcome is RunOutcome.Diverged or RunOutcome.Failed ? $"error: {outcome.Message}" : outcome.Message);
        return ExitCodes.For(outcome);
    }
}

/// <summary>Options shared by every command that builds a run configuration.</summary>
public sealed class RunConfigOptions
{
    public Option<FileInfo?> Config { get; } = new("--config", "-c") { Description = "HOCON file laid over hocon/elasticmoe.conf" };
    public Option<int?> Steps { get; } = Positive("--steps", "optimizer steps to run");
    public Option<long?> Seed { get; } = new("--seed") { Description = "seed of the run (parameters and batches)" };
    public Option<string?> Data { get; } = new("--data") { Description = "text file, or directory of token shards from `data prepare`, to train on (default: the embedded corpus)" };
    public Option<int?> Threads { get; } = NonNegative("--threads", "libtorch threads (0 = all cores)");
    public Option<string?> Device { get; } = new("--device") { Description = "cpu or cuda:N" };
    public Option<double?> TimeLimit { get; } = new("--time-limit") { Description = "stop after this many seconds (0 = no limit)" };
    public Option<string[]> Set { get; } = new("--set") { Description = "override any config key: --set train.lr=1e-3 (repeatable)", AllowMultipleArgumentsPerToken = false };

    public RunConfigOptions()
    {
        TimeLimit.Validators.Add(r =>
        {
            if (TryValue<double?>(r) is < 0) r.AddError("--time-limit must be zero or positive");
        });
        Set.Validators.Add(r =>
        {
            foreach (var s in r.GetValueOrDefault<string[]>() ?? [])
                if (!s.Contains('=')) r.AddError($"--set expects key=value, got '{s}'");
        });
    }

    public void AddTo(Command c)
    {
        foreach (var o in new Option[] { Config, Steps, Seed, Data, Threads, Device, TimeLimit, Set }) c.Options.Add(o);
    }

    public ElasticMoEConfig Build(ParseResult p, IEnumerable<KeyValuePair<string, string>>? extra = null)
    {
        var overrides = new List<KeyValuePair<string, string>>();
        foreach (var s in p.GetValue(Set) ?? [])
        {
            int eq = s.IndexOf('=');
            overrides.Add(new(s[..eq].Trim().StartsWith("elasticmoe.", StringComparison.Ordinal) ? s[..eq].Trim()["elasticmoe.".Length..] : s[..eq].Trim(), s[(eq + 1)..].Trim()));
        }
        void Add<T>(Option<T> o, string key)
        {
            if (p.GetValue(o) is { } v) overrides.Add(new(key, Convert.ToString(v, System.Globalization.CultureInfo.InvariantCulture)!));
        }
        Add(Steps, "train.steps");
        Add(Seed, "seed");
        Add(Data, "data.path");
        Add(Threads, "threads");
        Add(Device, "device");
        Add(TimeLimit, "train.time-limit");
        if (extra is not null) overrides.AddRange(extra);
        return ConfigLoader.Load(p.GetValue(Config)?.FullName, overrides);
    }

    // A value that does not parse is already a usage error of its own; the range check just skips it.
    private static T? TryValue<T>(System.CommandLine.Parsing.OptionResult r)
    {
        try { return r.GetValueOrDefault<T>(); }
        catch (InvalidOperationException) { return default; }
    }

    public static Option<int?> Positive(string name, string description)
    {
        var o = new Option<int?>(name) { Description = description };
        o.Validators.Add(r =>
        {
            if (TryValue<int?>(r) is <= 0) r.AddError($"{name} must be a positive integer");
        });
        return o;
    }

    public static Option<int?> NonNegative(string name, string description)
    {
        var o = new Option<int?>(name) { Description = description };
        o.Validators.Add(r =>
        {
            if (TryValue<int?>(r) is < 0) r.AddError($"{name} must be zero or a positive integer");
        });
        return o;
    }
}

/// <summary><c>elasticmoe train</c>: the main job.</summary>
public static class TrainCommand
{
    public static Command Create(TextWriter stdout, TextWriter stderr)
    {
        var cfg = new RunConfigOptions();
        var metrics = new Option<string?>("--metrics") { Description = "write one JSON line per step to this file" };
        var plots = new Option<string?>("--plots") { Description = "when the run ends, write PNGs of its metrics into this folder (as `elasticmoe plot`; a temporary metrics file without --metrics)" };
        var plotSize = new PlotSizeOptions("--plot-width", "--plot-height");
        var save = new Option<string?>("--save") { Description = "save checkpoints of the full training state into this run directory (at the end and every --save-every steps)" };
        var keep = RunConfigOptions.Positive("--keep", "committed checkpoints to keep in the --save directory (default 2)");
        var saveEvery = RunConfigOptions.NonNegative("--save-every", "save every N steps (0 = only at the end)");
        var resume = new Option<string?>("--resume") { Description = "continue from the newest valid checkpoint of a run directory written by --save" };
        var runDir = new Option<string?>("--run-dir") { Description = "cluster runs: keep the coordinator's journal and checkpoints here (checkpoint.every, checkpoint.keep); an existing run directory resumes its run, on any number of nodes and layout" };
        var single = new Option<bool>("--single-process") { Description = "run the plain training loop without actors (the reference the cluster must match)" };
        var nodes = RunConfigOptions.NonNegative("--nodes", "in-process cluster nodes to start (default 1; 0 = wait for external `elasticmoe node`s)");
        var expect = RunConfigOptions.Positive("--expect-nodes", "nodes to wait for before the first step (default: --nodes)");
        var pp = RunConfigOptions.Positive("--pp", "pipeline-parallel degree (data-parallel degree = workers / pp)");
        var port = RunConfigOptions.NonNegative("--port", "Akka remoting port of the coordinator (0 = any)");
        var standby = new Option<string?>("--standby-for")
        {
            Description = "start a stand-by coordinator: it joins the coordinator at this address (akka.tcp://elasticmoe@HOST:PORT) and, " +
                          "if that coordinator's node dies, takes the run over from the shared --run-dir journal and re-attaches its nodes",
        };
        standby.Validators.Add(r =>
        {
            if (r.GetValueOrDefault<string?>() is { } v && (!v.StartsWith("akka.tcp://", StringComparison.Ordinal) || !v.Contains('@')))
                r.AddError($"--standby-for must look like akka.tcp://elasticmoe@HOST:PORT, got '{v}'");
        });
        var relayout = new Option<string?>("--relayout") { Description = "change the layout at step boundaries: STEP=WORKERSxPP[,...], e.g. 10=4x2,20=2x1 (cluster.relayout)" };
        relayout.Validators.Add(r =>
        {
            try { if (r.GetValueOrDefault<string?>() is { } v) Planning.RelayoutSchedule.Parse(v); }
            catch (FormatException ex) { r.AddError(ex.Message); }
        });
        var cmd = new Command("train", "train the MoE model (embedded corpus unless --data is given)");
        cfg.AddTo(cmd);
        cmd.Options.Add(metrics);
        cmd.Options.Add(plots);
        plotSize.AddTo(cmd);
        cmd.Options.Add(save);
        cmd.Options.Add(saveEvery);
        cmd.Options.Add(keep);
        cmd.Options.Add(resume);
        foreach (var o in new Option[] { single, nodes, expect, pp, port, relayout, runDir, standby }) cmd.Options.Add(o);
        cmd.SetAction(p => Program.Guard(stderr, () =>
        {
            var extra = new List<KeyValuePair<string, string>>();
            if (p.GetValue(nodes) is { } n) extra.Add(new("cluster.nodes", n.ToString(System.Globalization.CultureInfo.InvariantCulture)));
            if (p.GetValue(expect) is { } x) extra.Add(new("cluster.expected-nodes", x.ToString(System.Globalization.CultureInfo.InvariantCulture)));
            if (p.GetValue(pp) is { } s) extra.Add(new("cluster.pipeline-stages", s.ToString(System.Globalization.CultureInfo.InvariantCulture)));
            if (p.GetValue(port) is { } po) extra.Add(new("cluster.port", po.ToString(System.Globalization.CultureInfo.InvariantCulture)));
            if (p.GetValue(relayout) is { } rl) extra.Add(new("cluster.relayout", rl));
            if (p.GetValue(standby) is { } primary)
            {
                if (p.GetValue(runDir) is null || p.GetValue(single))
                    throw new ConfigException("--standby-for needs --run-dir DIR: the journal it takes the run over from (shared with the coordinator it stands by for)");
                if (p.GetValue(nodes) is > 0) throw new ConfigException("--standby-for starts a coordinator only: leave out --nodes");
                extra.Add(new("cluster.seed-nodes", $"[\"{primary}\"]"));
                extra.Add(new("cluster.nodes", "0"));
            }
            var config = cfg.Build(p, extra);
            using var endpoint = Program.StartMetrics(config, stdout);
            var observer = endpoint is null ? null : RunMetrics.Observer;
            if (!p.GetValue(single))
            {
                if (p.GetValue(save) is not null || p.GetValue(resume) is not null)
                    throw new ConfigException("--save and --resume belong to --single-process; a cluster run keeps its checkpoints in --run-dir DIR");
                config = config with { RunDirectory = p.GetValue(runDir) };
                using var data = TextCorpus.Load(config);
                var (clusterConsole, clusterObserver, clusterBar) = TrainingProgress.For(stdout, config.Train.Steps, observer);
                using (clusterBar)
                    return PlotCommand.TrainThenPlot(p.GetValue(plots), p.GetValue(metrics), plotSize.Get(p), clusterConsole, stderr,
                        metricsPath => ClusterTrain.Run(config, data, metricsPath, clusterConsole, stderr, clusterObserver));
            }
            if (p.GetValue(runDir) is not null)
                throw new ConfigException("--run-dir is for cluster runs; --single-process saves with --save DIR and resumes with --resume DIR (the same checkpoint format)");
            using var corpus = TextCorpus.Load(config);
            var (console, stepObserver, bar) = TrainingProgress.For(stdout, config.Train.Steps, observer);
            using (bar)
                return PlotCommand.TrainThenPlot(p.GetValue(plots), p.GetValue(metrics), plotSize.Get(p), console, stderr, metricsPath =>
                {
                    using var trainer = new Trainer(config, corpus);
                    using var signals = new StopSignals(stderr, "stopping after the current step");
                    var summary = TrainingRun.Run(trainer, new RunOptions(metricsPath, p.GetValue(save), p.GetValue(resume), p.GetValue(saveEvery) ?? 0, p.GetValue(keep) ?? 2, stepObserver), console, signals.Token);
                    // The metrics file is closed by now. A signal that came during the last step changes nothing.
                    return summary.Stopped && signals.Received is { } signal
                        ? Program.Report(console, new RunOutcome.Stopped(signal, $"after step {trainer.Step}"))
                        : Program.ExitCodes.Ok;
                });
        }));
        return cmd;
    }
}
