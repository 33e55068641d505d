using System.Diagnostics;
using ElasticMoE.Benchmarks;

namespace ElasticMoE.Tests.Cluster;

/// <summary>
/// Availability traces (Bamboo / Oobleck CSV): parsed and scaled as pure code, and replayed for real by
/// <c>bench --suite trace</c> against node processes (SIGKILLs, notices, correlated removals, replacements).
/// </summary>
[Collection("cluster")]
public class TraceReplayTests(Xunit.Abstractions.ITestOutputHelper output)
{
    private const string Sample = "# a comment\ntime,event,node\n0,add,nodeA\n0,add,nodeB\n0,add,nodeC\n500,remove,nodeB\n900,remove,nodeA\n900,remove,nodeC\n1200,add,nodeD\n";

    [Fact]
    public void A_trace_is_read_with_its_peak_and_scaled_with_simultaneous_removals_together()
    {
        var t = AvailabilityTrace.Parse(Sample, "sample.csv");
        Assert.Equal(7, t.Events.Count);
        Assert.Equal(3, t.MaxNodes);
        Assert.Equal(new TraceEvent(900, false, "nodeA"), t.Events[4]);
        // At 2x: 3 nodes, then 2, then 0 (kept at 1: a run needs one), then 1 again (unchanged: dropped).
        Assert.Equal([(0.0, 3, 0), (0.25, 2, 1), (0.45, 1, 1)], t.Scaled(2, 3));
        // Scaled to a peak of 6: counts double, and the two removals at 900 ms are one instant of 4.
        Assert.Equal([(0.0, 6, 0), (0.5, 4, 2), (0.9, 1, 3), (1.2, 2, 0)], t.Scaled(1, 6));
    }

    [Theory]
    [InlineData("0,add,a\n0,add,a\n", "sample.csv:2: a is added while it is already available")]
    [InlineData("0,add,a\n10,remove,b\n", "sample.csv:2: b is removed while it is not available")]
    [InlineData("10,add,a\n5,add,b\n", "sample.csv:2: time 5 ms comes before the previous event's 10 ms")]
    [InlineData("0,join,a\n", "sample.csv:1: 'join' is neither add nor remove")]
    [InlineData("0,add\n", "sample.csv:1: expected 'milliseconds,add|remove,nodeNAME'")]
    [InlineData("-5,add,a\n", "sample.csv:1: '-5' is not a time in milliseconds")]
    [InlineData("# nothing\n", "sample.csv: no events")]
    public void A_bad_trace_is_refused_naming_the_line(string text, string message)
        => Assert.StartsWith(message, Assert.Throws<FormatException>(() => AvailabilityTrace.Parse(text, "sample.csv")).Message);

    [Fact]
    public void The_shipped_synthetic_trace_reads_and_has_correlated_removals()
    {
        var path = Path.Combine(RepoRoot(), "bench", "traces", "spot-synthetic.csv");
        var t = AvailabilityTrace.Parse(File.ReadAllText(path), path);
        Assert.Equal(4, t.MaxNodes);
        Assert.Contains(t.Events.Where(e => !e.Add).GroupBy(e => e.Milliseconds), g => g.Count() >= 3);
    }

    [Fact]
    public async Task Bench_trace_replays_the_synthetic_trace_and_every_step_keeps_the_fault_free_bits()
    {
        TestSupport.EnsureTorch();
        var logs = TestSupport.TempDir();
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        string[] args =
        [
            Path.Combine(AppContext.BaseDirectory, "elasticmoe.dll"), "bench", "--suite", "trace",
            "--trace", Path.Combine(RepoRoot(), "bench", "traces", "spot-synthetic.csv"), "--steps", "120", "--speed", "2", "--max-nodes", "4",
            "--logs", logs, "--threads", "1",
            "--set", "model.d-model=32", "--set", "model.layers=3", "--set", "model.heads=2", "--set", "model.context=16",
            "--set", "model.moe.routed-experts=4", "--set", "model.moe.expert-hidden=16", "--set", "model.dense-hidden=32",
            "--set", "train.global-batch=8", "--set", "train.micro-batch=2",
        ];
        foreach (var a in args) psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        using var cts = new CancellationTokenSource(TimeSpan.FromMinutes(8));
        try { await p.WaitForExitAsync(cts.Token); }
        finally { if (!p.HasExited) p.Kill(entireProcessTree: true); }
        var text = await stdout + await stderr;
        output.WriteLine(text);
        Assert.True(p.ExitCode == 0, text);
        Assert.Contains("trace: PASS", text);
        var bits = System.Text.RegularExpressions.Regex.Match(text, @"(\d+) of (\d+) step lines bit-identical to the fault-free run");
        Assert.True(bits.Success, text);
        Assert.Equal(bits.Groups[2].Value, bits.Groups[1].Value);
        Assert.True(int.Parse(bits.Groups[2].Value) >= 120);
        Assert.Matches(@"\d+ SIGKILL\(s\), \d+ notice\(s\)", text);
        Assert.Matches(@"step +\d+: -\d+ node\(s\)", text);   // removals really happened during the run
        Assert.Matches(@"goodput: .*: \d\.\d{3}", text);
    }

    private static string RepoRoot()
    {
        for (var d = new DirectoryInfo(AppContext.BaseDirectory); d is not null; d = d.Parent)
            if (File.Exists(Path.Combine(d.FullName, "ElasticMoE.sln"))) return d.FullName;
        throw new DirectoryNotFoundException("the repository root (ElasticMoE.sln) is not above the test binaries");
    }
}
