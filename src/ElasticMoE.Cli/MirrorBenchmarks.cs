using System.Diagnostics;
using System.Globalization;
using ElasticMoE.Benchmarks;

namespace ElasticMoE.Cli;

/// <summary>
/// <c>bench --suite mirrors</c>: what each extra mirror costs. Fault-free runs of a coordinator and 4 node processes with
/// <c>cluster.redundancy</c> 0, 1 and 2, in rotating order within each round (fresh processes each), so every level
/// sees the same box: tokens/s over the timed steps, the node processes' peak resident memory (<c>VmRSS</c>), and the
/// data-plane bytes each sends per step (its Prometheus counter <c>elasticmoe_dataplane_sent_bytes_total</c>, scraped
/// at the end of the warm-up and of the timed steps: activations, all-reduces, and the gradients to keepers).
/// </summary>
internal static class MirrorBenchmarks
{
    public static readonly int[] Levels = [0, 1, 2];
    private const int Nodes = 4;

    private sealed record Sample(double TokensPerSecond, double PeakRssMb, double BytesPerStep);

    public static (List<BenchFigure> Figures, bool Ok) Run(Configuration.ElasticMoEConfig config, IReadOnlyList<string> configArgs, int rounds, int timedSteps, string dir, TextWriter o)
    {
        const int warmup = 5;
        o.WriteLine($"mirrors: coordinator + {Nodes} node processes, fault-free, {warmup}+{timedSteps} steps, cluster.redundancy {string.Join(" / ", Levels)}, " +
                    $"{rounds} round(s) in rotating order (logs in {dir}) ...");
        var samples = Levels.ToDictionary(l => l, _ => new List<Sample>());
        for (int round = 0; round < rounds; round++)
            for (int i = 0; i < Levels.Length; i++)
            {
                int r = Levels[(i + round) % Levels.Length];
                var s = One(configArgs, r, warmup, timedSteps, Path.Combine(dir, $"round{round + 1}-redundancy{r}"), out var problem);
                if (s is null)
                {
                    o.WriteLine($"  round {round + 1}, redundancy {r}: failed ({problem})");
                    return ([], false);
                }
                samples[r].Add(s);
                o.WriteLine(string.Create(CultureInfo.InvariantCulture,
                    $"  round {round + 1}, redundancy {r}: {s.TokensPerSecond:F0} tok/s, peak RSS {s.PeakRssMb:F0} MB per node process, {s.BytesPerStep / 1024:F0} KiB sent per node process and step"));
            }
        static double Median(IEnumerable<double> v) { var l = v.Order().ToList(); return l[l.Count / 2]; }
        var figures = new List<BenchFigure>();
        var zero = samples[0];
        foreach (int r in Levels.Where(l => l > 0))
        {
            var s = samples[r];
            figures.Add(new($"tokens/s, redundancy = {r}", Median(s.Select(x => x.TokensPerSecond)), "tok/s", "redundancy = 0", Median(zero.Select(x => x.TokensPerSecond))));
            figures.Add(new($"peak RSS per node, redundancy = {r}", Median(s.Select(x => x.PeakRssMb)), "MB", "redundancy = 0", Median(zero.Select(x => x.PeakRssMb))));
            figures.Add(new($"data-plane KiB sent per node and step, redundancy = {r}", Median(s.Select(x => x.BytesPerStep)) / 1024, "KiB", "redundancy = 0", Median(zero.Select(x => x.BytesPerStep)) / 1024));
        }
        // What the plans imply, to read the measured figures against (the counters also hold activations and all-reduces).
        var sizes = Runtime.Benchmarks.ReplanBenchmark.UnitSizes(config);
        var slots = Enumerable.Range(0, Nodes).Select(i => new Planning.WorkerSlot(new Planning.WorkerId($"node{i}", 1, 0), $"node{i}:1")).ToList();
        int pp = Enumerable.Range(1, Math.Min(config.Cluster.PipelineStages, Nodes)).Reverse().First(p => Nodes % p == 0);
        foreach (int r in Levels.Where(l => l > 0))
        {
            var plan = Planning.ElasticPlanner.Next(null, slots, Nodes, pp, config.Model, 1, r);
            double state = Enumerable.Range(0, Nodes).Sum(k => plan.MirrorsHeldBy(k, config.Model).Sum(m => sizes[m.Unit])) / (double)Nodes;
            // A mirrored unit's gradient is a third of its state (values and two moments), sent once per keeper.
            o.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"  redundancy {r} by the plan (DP {Nodes / pp} x PP {pp}): {state / 1024:F0} KiB of mirrored state kept per node, ~{state / 3 / 1024:F0} KiB of mirror gradients sent per node and step"));
            figures.Add(new($"mirrored state kept per node, redundancy = {r} (plan)", state / 1024, "KiB"));
        }
        foreach (var f in figures.Where(f => f.BaselineValue is not null))
            o.WriteLine(string.Create(CultureInfo.InvariantCulture, $"  {f.Name}: {f.Value:F1} {f.Unit} vs {f.BaselineValue:F1} ({f.Ratio:F3}x)"));
        return (figures, true);
    }

    private static Sample? One(IReadOnlyList<string> configArgs, int redundancy, int warmup, int timedSteps, string dir, out string? problem)
    {
        problem = null;
        var args = RecoveryBenchmarks.BaseArgs(configArgs).Concat(["--set", $"cluster.redundancy={redundancy}"]).ToList();
        using var cluster = new ProcessCluster(dir, args);
        var m = cluster.Metrics;
        var overall = Stopwatch.StartNew();
        int steps = warmup + timedSteps + 1;
        var peak = new Dictionary<int, long>();
        long[] written = [];
        void SampleMemory()
        {
            foreach (var n in cluster.Nodes.Where(n => n.Alive))
                if (Rss(n.Process.Id) is { } kb) peak[n.Process.Id] = Math.Max(peak.GetValueOrDefault(n.Process.Id), kb);
        }
        var ports = Enumerable.Range(0, Nodes).Select(_ => Runtime.Hosting.LoopbackPorts.Next()).ToArray();
        long[] Written() => ports.Select(SentBytes).ToArray();
        try
        {
            var coordinator = cluster.StartCoordinator(Nodes, steps);
            for (int i = 0; i < Nodes; i++) cluster.StartNode(extra: ["--set", $"metrics.prometheus.port={ports[i]}"]);
            void Wait(Func<bool> done, string what) => cluster.Wait(() => { SampleMemory(); return done(); }, what, TimeSpan.FromSeconds(120), overall, TimeSpan.FromMinutes(10));
            Wait(() => m.LastStep >= warmup, $"step {warmup}");
            written = Written();
            Wait(() => m.LastStep >= steps - 1, $"step {steps - 1}");
            var after = Written();
            var perStep = after.Zip(written, (a, b) => (double)(a - b)).Average() / (m.LastStep - warmup);
            Wait(() => !coordinator.Alive, "the end of the run");
            cluster.StopAll(TimeSpan.FromSeconds(15));
            m.Poll();
            if (coordinator.Process.ExitCode != 0) { problem = $"coordinator exit {coordinator.Process.ExitCode}"; return null; }
            var s = m.Steps;
            var timed = s.Where(x => x.Step > warmup && x.Step < s[^1].Step).ToList();
            double tokens = timed.Sum(x => x.Tokens) / (timed[^1].SeenUnix - s.First(x => x.Step == warmup).SeenUnix);
            return new Sample(tokens, peak.Count == 0 ? double.NaN : peak.Values.Average() / 1024.0, perStep);
        }
        catch (ProcessCluster.Stopped ex)
        {
            cluster.StopAll(TimeSpan.Zero);
            problem = ex.Message;
            return null;
        }
    }

    // VmRSS of a process in KiB (Linux), null when it is gone.
    private static long? Rss(int pid) => ProcField($"/proc/{pid}/status", "VmRSS:");

    private static readonly HttpClient Http = new() { Timeout = TimeSpan.FromSeconds(5) };

    // The node's data-plane bytes sent so far, from its metrics endpoint on `port`.
    private static long SentBytes(int port)
    {
        string text;
        try { text = Http.GetStringAsync($"http://127.0.0.1:{port}/metrics").GetAwaiter().GetResult(); }
        catch (Exception ex) when (ex is HttpRequestException or TaskCanceledException)
        {
            throw new ProcessCluster.Stopped($"the metrics endpoint 127.0.0.1:{port} did not answer: {ex.Message}");
        }
        foreach (var line in text.Split('\n'))
            if (line.StartsWith("elasticmoe_dataplane_sent_bytes_total ", StringComparison.Ordinal))
                return (long)double.Parse(line["elasticmoe_dataplane_sent_bytes_total ".Length..], CultureInfo.InvariantCulture);
        throw new ProcessCluster.Stopped($"no data-plane counter at 127.0.0.1:{port}/metrics");
    }

    private static long? ProcField(string path, string field)
    {
        try
        {
            foreach (var line in File.ReadLines(path))
                if (line.StartsWith(field, StringComparison.Ordinal))
                    return long.Parse(line[field.Length..].Trim().Split(' ')[0], CultureInfo.InvariantCulture);
        }
        catch (IOException) { }
        catch (UnauthorizedAccessException) { }
        return null;
    }
}
