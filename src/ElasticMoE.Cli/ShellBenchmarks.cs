using System.Diagnostics;
using System.Globalization;
using ElasticMoE.Benchmarks;
using ElasticMoE.Runtime.Hosting;
using ElasticMoE.Runtime.Protocol;

namespace ElasticMoE.Cli;

/// <summary>
/// <c>bench --suite shell</c>: how fast the actor shell answers while a cluster trains, and while one of
/// its nodes is SIGKILLed. A coordinator and three node processes train; a shell client asks
/// <c>train status</c> and <c>cluster show</c> in turn, back to back, for a while; then a node is killed
/// and the asking goes on until the run has committed a step after the loss. Percentiles of each window
/// are reported, the kill's failure detection (kill → the coordinator saw it) as the baseline the issue
/// measures the kill window against.
/// </summary>
internal static class ShellBenchmarks
{
    private sealed record Sample(string Command, double Ms);

    public static (List<BenchFigure> Figures, bool Ok) Latency(IReadOnlyList<string> configArgs, int steps, string dir, TextWriter log)
    {
        var figures = new List<BenchFigure>();
        using var cluster = new ProcessCluster(dir, RecoveryBenchmarks.BaseArgs(configArgs));
        var m = cluster.Metrics;
        try
        {
            cluster.StartCoordinator(3, steps);
            for (int i = 0; i < 3; i++) cluster.StartNode();
            WaitFor(() => m.LastStep >= 5, m, "step 5");
            log.WriteLine($"shell: a coordinator and 3 nodes training; asking `train status` and `cluster show` back to back ...");
            var client = ShellClient.ConnectAsync($"127.0.0.1:{cluster.Port}", TimeSpan.FromSeconds(10)).GetAwaiter().GetResult();
            try
            {
                var training = Ask(client, TimeSpan.FromSeconds(20), () => false, m);
                var victim = cluster.Nodes[^1];
                double killed = ProcessCluster.Kill(victim);
                long before = m.LastStep;
                // Until a step after the loss is committed (the recovery's end), and at least the ~4.5 s a
                // failure detector would have needed, so the window covers both ways of finding a dead node.
                var sinceKill = Stopwatch.StartNew();
                var duringKill = Ask(client, TimeSpan.FromSeconds(60),
                    () => m.Events.Any(e => e.Kind == "node-lost") && m.LastStep > before + 1 && sinceKill.Elapsed > TimeSpan.FromSeconds(5), m);
                var lost = m.Events.FirstOrDefault(e => e.Kind == "node-lost");
                double detection = lost is null ? double.NaN : (lost.DetectedUnix - killed) * 1000;
                foreach (var (window, samples) in new[] { ("training", training), ("node kill", duringKill) })
                    foreach (var command in new[] { "train status", "cluster show" })
                    {
                        var ms = samples.Where(s => s.Command == command).Select(s => s.Ms).Order().ToList();
                        if (ms.Count == 0) continue;
                        log.WriteLine(string.Create(CultureInfo.InvariantCulture,
                            $"  {command,-12} during {window,-9}: {ms.Count,5} answers, p50 {Percentile(ms, 0.5):F1} ms, p95 {Percentile(ms, 0.95):F1} ms, max {ms[^1]:F1} ms"));
                        figures.Add(new($"shell {command} p95 ({window})", Percentile(ms, 0.95), "ms",
                            window == "training" ? null : "failure detection of the kill", window == "training" ? null : detection));
                    }
                // The bar: every answer during a loss within twice the failure-detection time.
                figures.Add(new("shell slowest answer (node kill)", duringKill.Max(s => s.Ms), "ms", "2 x failure detection of the kill", 2 * detection));
                log.WriteLine(string.Create(CultureInfo.InvariantCulture, $"  the kill was detected {detection:F0} ms after the SIGKILL; recovery {lost?.RecoverySeconds ?? double.NaN:F2} s"));
                bool answered = training.Count > 0 && duringKill.Count > 0 && !double.IsNaN(detection);
                return (figures, answered);
            }
            finally
            {
                client.DisposeAsync().AsTask().GetAwaiter().GetResult();
            }
        }
        catch (Exception ex) when (ex is InvalidOperationException or TimeoutException or ShellUnreachableException)
        {
            log.WriteLine($"shell: {ex.Message} (logs in {dir})");
            return (figures, false);
        }
        finally
        {
            cluster.StopAll(TimeSpan.FromSeconds(5));
        }
    }

    // Asks the two commands in turn until `stop` holds or `duration` passed; every answer timed.
    private static List<Sample> Ask(ShellClient client, TimeSpan duration, Func<bool> stop, MetricsTail metrics)
    {
        var samples = new List<Sample>();
        var clock = Stopwatch.StartNew();
        for (int i = 0; clock.Elapsed < duration && !stop(); i++)
        {
            bool status = i % 2 == 0;
            var t = Stopwatch.StartNew();
            var reply = client.AskAsync(status ? new ShellTrainStatusQuery() : new ShellClusterQuery()).GetAwaiter().GetResult();
            double ms = t.Elapsed.TotalMilliseconds;
            if (reply is ShellError e) throw new InvalidOperationException($"the shell endpoint answered with an error: {e}");
            samples.Add(new(status ? "train status" : "cluster show", ms));
            metrics.Poll();
        }
        return samples;
    }

    private static void WaitFor(Func<bool> done, MetricsTail m, string what)
    {
        var sw = Stopwatch.StartNew();
        while (true)
        {
            m.Poll();
            if (done()) return;
            if (sw.Elapsed > TimeSpan.FromMinutes(3)) throw new TimeoutException($"the cluster did not reach {what} within 3 minutes");
            Thread.Sleep(20);
        }
    }

    private static double Percentile(IReadOnlyList<double> sorted, double q)
        => sorted[Math.Min(sorted.Count - 1, (int)Math.Ceiling(q * sorted.Count) - 1)];
}
