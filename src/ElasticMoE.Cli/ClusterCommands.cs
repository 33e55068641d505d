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
    public static int Run(ElasticMoEConfig config, TextCorpus corpus, string? metrics, TextWriter stdout)
    {
        TorchSetup.Configure(config);
        using var report = new TrainingReport(stdout, metrics);
        report.Info($"ElasticMoE cluster: {config.Cluster.Nodes} in-process node(s) x {config.Cluster.Devices} device(s), " +
                    $"waiting for {config.Cluster.NodesToWaitFor} node(s), data {corpus.Name}, {TorchSharp.torch.get_num_threads()} threads");
        using var cancel = new CancellationTokenSource();
        ConsoleCancelEventHandler onCancel = (_, e) => { e.Cancel = true; cancel.Cancel(); };
        Console.CancelKeyPress += onCancel;
        try
        {
            var result = LocalCluster.Run(config, corpus, report, cancel.Token);
            if (result.Steps.Count > 0)
            {
                double first = result.Steps[0].Loss, last = result.Steps[^1].Loss;
                double tps = result.Steps.Sum(s => s.Tokens) / result.Steps.Sum(s => s.Seconds);
                report.Info(string.Create(CultureInfo.InvariantCulture,
                    $"done: {result.Steps.Count} steps in {result.Seconds:F1} s, loss {first:F4} -> {last:F4} ({last / first:P0} of first)" +
                    $"{(result.Validation.Count > 0 ? $", validation {result.Validation[^1].ValLoss:F4}" : "")}, {tps:F0} tokens/s"));
            }
            return Program.ExitCodes.Ok;
        }
        catch (OperationCanceledException)
        {
            report.Info("interrupted");
            return Program.ExitCodes.Failed;
        }
        finally
        {
            Console.CancelKeyPress -= onCancel;
        }
    }
}

/// <summary><c>elasticmoe node</c>: a worker node that joins a coordinator and serves until told to stop.</summary>
public static class NodeCommand
{
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
        var cmd = new Command("node", "start a worker node that joins the cluster");
        cfg.AddTo(cmd);
        cmd.Options.Add(seed);
        cmd.Options.Add(port);
        cmd.Options.Add(devices);
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
            var corpus = TextCorpus.Load(config.Data.Path, config.Data.ValidationFraction, config.Model.Context);
            var loop = new ComputeLoop();
            var node = ClusterNode.Start(config, corpus, coordinator: false, worker: true, loop: loop);
            stdout.WriteLine($"node {node.Address} joining {string.Join(", ", config.Cluster.SeedNodes)}");
            loop.RunUntil(node.Stopped);   // this thread computes for the node's first worker
            string reason = node.Stopped.GetAwaiter().GetResult();
            node.DisposeAsync().AsTask().GetAwaiter().GetResult();
            stdout.WriteLine($"node stopped: {reason}");
            return reason == "training finished" ? Program.ExitCodes.Ok : Program.ExitCodes.Failed;
        }));
        return cmd;
    }
}
