using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using Xunit.Abstractions;

namespace ElasticMoE.Tests.Cluster;

/// <summary>Separate OS processes: a coordinator and two <c>elasticmoe node</c>s on loopback, as the README shows.</summary>
[Collection("cluster")]
public class MultiProcessTests(ITestOutputHelper output)
{
    private static readonly string[] Tiny =
    [
        "--set", "model.d-model=32", "--set", "model.layers=3", "--set", "model.heads=2", "--set", "model.context=16",
        "--set", "model.moe.routed-experts=4", "--set", "model.moe.expert-hidden=16", "--set", "model.dense-hidden=32",
        "--set", "train.global-batch=8", "--set", "train.micro-batch=2", "--set", "train.eval-every=5", "--set", "train.eval-batches=2",
        "--threads", "1",
    ];

    private static int FreePort()
    {
        using var l = new TcpListener(IPAddress.Loopback, 0);
        l.Start();
        return ((IPEndPoint)l.LocalEndpoint).Port;
    }

    private static Process Start(params string[] args)
    {
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        psi.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "elasticmoe.dll"));
        foreach (var a in args) psi.ArgumentList.Add(a);
        return Process.Start(psi)!;
    }

    private static async Task<(int Code, string Out)> Finish(Process p, TimeSpan timeout)
    {
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        using var cts = new CancellationTokenSource(timeout);
        try { await p.WaitForExitAsync(cts.Token); }
        catch (OperationCanceledException) { p.Kill(entireProcessTree: true); }
        return (p.HasExited ? p.ExitCode : -1, await stdout + await stderr);
    }

    [Fact]
    public async Task A_coordinator_and_two_node_processes_train_the_model()
    {
        TestSupport.EnsureTorch();   // patches the native library next to elasticmoe.dll before the children load it
        int port = FreePort();
        var coordinator = Start(["train", "--nodes", "0", "--expect-nodes", "2", "--port", port.ToString(), "--steps", "6", .. Tiny]);
        var seed = $"akka.tcp://elasticmoe@127.0.0.1:{port}";
        var nodes = new[] { Start(["node", "--seed-node", seed, .. Tiny]), Start(["node", "--seed-node", seed, .. Tiny]) };
        try
        {
            var (code, text) = await Finish(coordinator, TimeSpan.FromMinutes(3));
            output.WriteLine(text);
            Assert.True(code == 0, text);
            Assert.Contains("DP 2 x PP 1", text);
            Assert.Contains("step     6/6", text);
            Assert.Contains("val ", text);
            foreach (var n in nodes)
            {
                var (nodeCode, nodeText) = await Finish(n, TimeSpan.FromSeconds(60));
                Assert.True(nodeCode == 0, nodeText);
                Assert.Contains("node stopped: training finished", nodeText);
            }
        }
        finally
        {
            foreach (var p in nodes.Append(coordinator))
                if (!p.HasExited) p.Kill(entireProcessTree: true);
        }
    }

    [Fact]
    public async Task Killing_a_node_with_SIGKILL_stops_the_run_naming_the_node()
    {
        TestSupport.EnsureTorch();
        int port = FreePort();
        var coordinator = Start(["train", "--nodes", "0", "--expect-nodes", "2", "--port", port.ToString(), "--steps", "100000", .. Tiny]);
        var seed = $"akka.tcp://elasticmoe@127.0.0.1:{port}";
        var survivor = Start(["node", "--seed-node", seed, .. Tiny]);
        var victim = Start(["node", "--seed-node", seed, .. Tiny]);
        var seen = new System.Text.StringBuilder();
        try
        {
            // Wait until training is under way, then kill one node outright: no goodbye, no leave.
            var started = new TaskCompletionSource();
            var pump = Task.Run(async () =>
            {
                string? line;
                while ((line = await coordinator.StandardOutput.ReadLineAsync()) is not null)
                {
                    lock (seen) seen.AppendLine(line);
                    if (line.StartsWith("step     3/", StringComparison.Ordinal)) started.TrySetResult();
                }
            });
            await started.Task.WaitAsync(TimeSpan.FromMinutes(2));
            victim.Kill(entireProcessTree: false);   // SIGKILL on Linux
            var stderr = coordinator.StandardError.ReadToEndAsync();
            using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(90));
            await coordinator.WaitForExitAsync(cts.Token);
            await pump;
            var err = await stderr;
            output.WriteLine(seen.ToString());
            output.WriteLine(err);
            Assert.Equal(4, coordinator.ExitCode);
            Assert.Matches("node akka\\.tcp://elasticmoe@127\\.0\\.0\\.1:\\d+ (became unreachable|left the cluster) at step \\d+", err);
            var (code, text) = await Finish(survivor, TimeSpan.FromSeconds(60));
            Assert.True(code == 4, text);   // told to stop because the run failed, and says so
            Assert.Contains("node stopped:", text);
        }
        finally
        {
            foreach (var p in new[] { coordinator, survivor, victim })
                if (!p.HasExited) p.Kill(entireProcessTree: true);
        }
    }
}
