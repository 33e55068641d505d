using System.CommandLine;
using System.Globalization;
using ElasticMoE.Configuration;
using ElasticMoE.Data;
using ElasticMoE.Runtime.Actors;
using ElasticMoE.Runtime.Hosting;
using ElasticMoE.Training;

namespace ElasticMoE.Cli;

/// <summary>The distributed <c>train</c>: coordinator plus an in-process local cluster (or external nodes).</summary>
public static class ClusterTrain
{
    /// <remarks>
    /// On SIGTERM or SIGINT the coordinator is sent <see cref="Runtime.Protocol.StopRun"/>: the step in
    /// flight commits and is reported, the nodes are told the run was stopped and torn down, the
    /// metrics file is closed, and the process exits with 128 + the signal number, about 1 s after the
    /// signal here. If the run fails once a stop signal has arrived (the same shutdown often stops the
    /// nodes too), the signal still decides the exit code.
    /// </remarks>
    /// <param name="observer">Also sees each step and membership change (the Prometheus metrics, when served).</param>
    public static int Run(ElasticMoEConfig config, TextCorpus corpus, string? metrics, TextWriter stdout, TextWriter stderr, ITrainingObserver? observer)
    {
        TorchSetup.Configure(config);
        using var signals = new StopSignals(stderr, "stopping after the current step");
        RunOutcome outcome;
        using (var report = new TrainingReport(stdout, metrics, observer))
        {
            report.Info($"ElasticMoE cluster: {config.Cluster.Nodes} in-process node(s) x {config.Cluster.Devices} device(s), " +
                        $"waiting for {config.Cluster.NodesToWaitFor} node(s), data {corpus.Name}, {TorchSharp.torch.get_num_threads()} threads");
            try
            {
                var result = LocalCluster.Run(config, corpus, report, signals.Reason);
                if (result.Steps.Count > 0)
                {
                    double first = result.Steps[0].Loss, last = result.Steps[^1].Loss;
                    double tps = result.Steps.Sum(s => s.Tokens) / result.Steps.Sum(s => s.Seconds);
                    report.Info(string.Create(CultureInfo.InvariantCulture,
                        $"done: {result.Steps.Count} steps in {result.Seconds:F1} s, loss {first:F4} -> {last:F4} ({last / first:P0} of first)" +
                        $"{(result.Validation.Count > 0 ? $", validation {result.Validation[^1].ValLoss:F4}" : "")}, {tps:F0} tokens/s, " +
                        $"{result.RedoneAttempts} step attempt(s) redone"));
                }
                outcome = (result.StoppedBy, signals.Received) switch
                {
                    (null, _) => new RunOutcome.Finished(),
                    (_, { } signal) => new RunOutcome.Stopped(signal, AfterStep(report.LastStep)),
                    (var reason, null) => new RunOutcome.RunStopped(reason),
                };
            }
            catch (TrainingFailedException ex) when (signals.Received is { } signal)
            {
                outcome = new RunOutcome.Stopped(signal, $"{AfterStep(report.LastStep)} ({ex.Message})");
            }
        }   // the metrics file is complete and closed before the last word
        return outcome is RunOutcome.Finished ? Program.ExitCodes.Ok : Program.Report(stdout, outcome);
    }

    private static string AfterStep(long step) => step > 0 ? $"after step {step}" : "before the first step";
}

/// <summary><c>elasticmoe node</c>: a worker node that joins a coordinator and serves until told to stop.</summary>
public static class NodeCommand
{
    // A signalled node's budget: leaving takes a few gossip rounds (0.5 s measured here, with the
    // 250 ms gossip of ClusterNode's config; signal to exit 0.8 s), terminating less; both well
    // inside StopSignals.HardDeadline.
    private static readonly TimeSpan NodeLeaveTimeout = TimeSpan.FromSeconds(1.5);
    // Before leaving, the node's units move to the workers that stay (the coordinator re-plans at the
    // next step boundary: one step plus the install, ~0.2 s for the default model here). Past this the
    // node leaves anyway and the run stops naming it; hand-over, leave and terminate stay inside
    // StopSignals' 4 s hard deadline.
    private static readonly TimeSpan NodeHandOverTimeout = TimeSpan.FromSeconds(2);
    private static readonly TimeSpan NodeTerminateTimeout = TimeSpan.FromSeconds(1);
    // With a preemption notice the hand-over gets what the notice leaves after leaving and terminating, less this.
    private static readonly TimeSpan NoticeMargin = TimeSpan.FromSeconds(0.5);
    /// <summary>The shortest notice that leaves a hand-over any time at all (0.5 s): leave + terminate + margin + 0.5 s.</summary>
    public static readonly double MinNoticeSeconds = (NodeLeaveTimeout + NodeTerminateTimeout + NoticeMargin).TotalSeconds + 0.5;

    /// <summary>A SIGTERM's budgets: the hand-over's timeout and the forced exit's deadline, by the notice (null: the defaults).</summary>
    public static (TimeSpan HandOver, TimeSpan HardDeadline) Budgets(double? noticeSeconds) => noticeSeconds is { } n
        ? (TimeSpan.FromSeconds(n) - NodeLeaveTimeout - NodeTerminateTimeout - NoticeMargin, TimeSpan.FromSeconds(n))
        : (NodeHandOverTimeout, StopSignals.HardDeadline);

    public static Command Create(TextWriter stdout, TextWriter stderr)
    {
        var cfg = new RunConfigOptions();
        var seed = new Option<string[]>("--seed-node") { Description = "address of the coordinator, e.g. akka.tcp://elasticmoe@127.0.0.1:4053 (repeatable)" };
        seed.Validators.Add(r =>
        {
            foreach (var s in r.GetValueOrDefault<string[]>() ?? [])
                if (!s.StartsWith("akka.tcp://", StringComparison.Ordinal) || !s.Contains('@'))
                    r.AddError($"--seed-node must look like akka.tcp://elasticmoe@HOST:PORT, got '{s}'");
        });
        var port = RunConfigOptions.NonNegative("--port", "Akka remoting port of this node (0 = any)");
        var devices = RunConfigOptions.Positive("--devices", "workers this node hosts");
        var notice = new Option<double?>("--notice-seconds")
        {
            Description = "preemption notice: after SIGTERM this node has this long before its machine goes (clouds give 30-120 s); " +
                          "it hands its units over within it, nodes noticed together leaving in one re-plan, then exits",
        };
        notice.Validators.Add(r =>
        {
            if (r.GetValueOrDefault<double?>() is { } n && !(n >= MinNoticeSeconds))
                r.AddError($"--notice-seconds must be at least {MinNoticeSeconds:F1} (leaving the cluster and terminating take {(NodeLeaveTimeout + NodeTerminateTimeout + NoticeMargin).TotalSeconds:F1} s of it), got {n}");
        });
        var cmd = new Command("node", "start a worker node that joins the cluster");
        cfg.AddTo(cmd);
        cmd.Options.Add(seed);
        cmd.Options.Add(port);
        cmd.Options.Add(devices);
        cmd.Options.Add(notice);
        cmd.SetAction(p => Program.Guard(stderr, () =>
        {
            var extra = new List<KeyValuePair<string, string>>();
            var seeds = p.GetValue(seed) ?? [];
            if (seeds.Length > 0) extra.Add(new("cluster.seed-nodes", "[" + string.Join(",", seeds.Select(s => $"\"{s}\"")) + "]"));
            if (p.GetValue(port) is { } po) extra.Add(new("cluster.port", po.ToString(CultureInfo.InvariantCulture)));
            if (p.GetValue(devices) is { } d) extra.Add(new("cluster.devices", d.ToString(CultureInfo.InvariantCulture)));
            var config = cfg.Build(p, extra);
            if (config.Cluster.SeedNodes.Count == 0)
                throw new ConfigException("elasticmoe node needs the coordinator's address: --seed-node akka.tcp://elasticmoe@HOST:PORT");
            using var corpus = TextCorpus.Load(config);   // a shard directory stays mapped until the node ends
            using var endpoint = Program.StartMetrics(config, stdout);   // data-plane bytes and the process's own figures
            var (handOverBudget, hardDeadline) = Budgets(p.GetValue(notice));
            using var signals = new StopSignals(stderr, p.GetValue(notice) is { } n
                ? $"preemption notice of {n:F0} s: handing the units over and leaving the cluster" : "leaving the cluster", hardDeadline);
            var loop = new ComputeLoop();
            // Incarnations: a node whose coordinator dies keeps its units and waits for the next one.
            var host = WorkerNodeHost.Start(config, corpus, loop, line => stdout.WriteLine(line));
            stdout.WriteLine($"node {host.Current.Address} joining {string.Join(", ", config.Cluster.SeedNodes)}");
            // On SIGTERM/SIGINT: leave gracefully, so the coordinator sees "left the cluster" at once
            // (not "unreachable" after the failure detector's seconds), then terminate.
            bool handedOver = false;
            var left = signals.First.ContinueWith(async _ =>
            {
                host.EndAfterThisIncarnation();
                var node = host.Current;
                handedOver = await node.HandOverAsync(handOverBudget).ConfigureAwait(false);
                await node.ShutdownAsync(NodeLeaveTimeout, NodeTerminateTimeout).ConfigureAwait(false);
            }, TaskScheduler.Default).Unwrap();
            loop.RunUntil(Task.WhenAny(host.Stopped, left));   // this thread computes for the node's first worker
            RunOutcome outcome;
            if (signals.Received is { } signal)
            {
                left.GetAwaiter().GetResult();   // bounded by the two timeouts
                outcome = new RunOutcome.Stopped(signal, handedOver ? "after handing its units over and leaving the cluster" : "after leaving the cluster (its units were not handed over in time)");
            }
            else
            {
                outcome = host.Stopped.GetAwaiter().GetResult();
            }
            stdout.WriteLine($"node stopped: {outcome.Message}");
            return Program.ExitCodes.For(outcome);
        }));
        return cmd;
    }
}
