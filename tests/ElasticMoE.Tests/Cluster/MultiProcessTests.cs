using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using Xunit.Abstractions;
using ElasticMoE.Runtime.Hosting;

namespace ElasticMoE.Tests.Cluster;

/// <summary>Separate OS processes: a coordinator and two <c>elasticmoe node</c>s on loopback, as the README shows.</summary>
[Collection("cluster")]
public class MultiProcessTests(ITestOutputHelper output)
{
    private static Process Start(params string[] args) => NodeProcesses.Start(args);
    private static Task<(int Code, string Out)> Finish(Process p, TimeSpan timeout) => NodeProcesses.Finish(p, timeout);

    private static readonly string[] Tiny =
    [
        "--set", "model.d-model=32", "--set", "model.layers=3", "--set", "model.heads=2", "--set", "model.context=16",
        "--set", "model.moe.routed-experts=4", "--set", "model.moe.expert-hidden=16", "--set", "model.dense-hidden=32",
        "--set", "train.global-batch=8", "--set", "train.micro-batch=2", "--set", "train.eval-every=5", "--set", "train.eval-batches=2",
        "--threads", "1",
    ];

    [Fact]
    public async Task A_coordinator_and_two_node_processes_train_the_model()
    {
        TestSupport.EnsureTorch();   // patches the native library next to elasticmoe.dll before the children load it
        int port = LoopbackPorts.Next();
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
    public async Task A_node_whose_coordinator_was_SIGKILLed_waits_for_one_with_its_units_then_stops_saying_so()
    {
        // A node without its coordinator keeps its units and waits for one to come back (a coordinator
        // started again re-attaches it: ResumeTests); when none does within cluster.coordinator-wait it
        // must say so and exit with its own code instead of hanging.
        TestSupport.EnsureTorch();
        int port = LoopbackPorts.Next();
        var coordinator = Start(["train", "--nodes", "0", "--expect-nodes", "2", "--port", port.ToString(), "--steps", "100000", .. Tiny]);
        var seed = $"akka.tcp://elasticmoe@127.0.0.1:{port}";
        string[] wait = ["--set", "cluster.coordinator-wait=3"];
        var nodes = new[] { Start(["node", "--seed-node", seed, .. Tiny, .. wait]), Start(["node", "--seed-node", seed, .. Tiny, .. wait]) };
        try
        {
            var started = new TaskCompletionSource();
            var pump = Task.Run(async () =>
            {
                string? line;
                while ((line = await coordinator.StandardOutput.ReadLineAsync()) is not null)
                    if (line.StartsWith("step     3/", StringComparison.Ordinal)) started.TrySetResult();
            });
            await started.Task.WaitAsync(TimeSpan.FromMinutes(2));
            coordinator.Kill(entireProcessTree: false);   // SIGKILL: no goodbye
            foreach (var n in nodes)
            {
                var (code, text) = await Finish(n, TimeSpan.FromSeconds(60));
                output.WriteLine(text);
                Assert.True(code == 6, $"exit {code}: {text}");   // ExitCodes: coordinator lost
                Assert.Contains("this node keeps its units and joins " + seed + " again", text);
                Assert.Contains("did not come back within 3 s (cluster.coordinator-wait)", text);
            }
        }
        finally
        {
            foreach (var p in nodes.Append(coordinator))
                if (!p.HasExited) p.Kill(entireProcessTree: true);
        }
    }

    [Fact]
    public async Task Four_node_processes_re_laid_out_mid_run_match_the_single_process_loop()
    {
        // The re-layout of ReplanTests across real OS processes: units cross process boundaries on the
        // data plane, and every committed step must still match the single-process loop.
        TestSupport.EnsureTorch();
        const int steps = 50;
        var settings = TestSupport.SmallSettings(("seed", "1"), ("model.layers", "4"), ("model.dense-layers", "1"), ("model.moe.routed-experts", "6"),
            ("train.global-batch", "12"), ("train.micro-batch", "2"), ("train.steps", steps.ToString()), ("train.eval-every", "25"),
            ("train.eval-batches", "2"), ("cluster.checksum-every", "5"));
        var args = TestSupport.SetArguments(settings);
        var reference = SingleProcessReference.Train(TestSupport.SmallConfig(settings.Select(kv => (kv.Key, kv.Value)).ToArray()), steps).Steps;
        int port = LoopbackPorts.Next();
        var metrics = Path.Combine(TestSupport.TempDir(), "metrics.jsonl");
        var coordinator = Start(["train", "--nodes", "0", "--expect-nodes", "4", "--port", port.ToString(), "--metrics", metrics,
            "--relayout", "10=4x2,20=4x4,30=2x1,40=3x1", .. args]);
        var seed = $"akka.tcp://elasticmoe@127.0.0.1:{port}";
        var nodes = Enumerable.Range(0, 4).Select(_ => Start(["node", "--seed-node", seed, .. args])).ToArray();
        await RunMatchesTheLoop(coordinator, nodes, TimeSpan.FromMinutes(4), metrics, reference, "DP 4 x PP 1", "DP 2 x PP 2", "DP 1 x PP 4", "DP 2 x PP 1", "DP 3 x PP 1");
    }

    [Fact]
    public async Task Nodes_started_with_different_thread_counts_train_the_single_process_loops_bits()
    {
        // Canonical reduction, item 2: a micro-batch's forward and backward give the same bits on any worker,
        // whatever its libtorch thread count. Widths where libtorch does split work over threads (d 128, 64
        // positions, batches of 2 x 64 rows), nodes at 2, 1 and 2 threads, a re-layout to PP 2 mid-run so each
        // node computes other parts of the model, against the loop in this process at 1 thread.
        TestSupport.EnsureTorch();
        const int steps = 16;
        var settings = TestSupport.SmallSettings(("seed", "3"), ("model.d-model", "128"), ("model.heads", "4"), ("model.context", "64"),
            ("model.layers", "4"), ("model.dense-hidden", "288"), ("model.moe.routed-experts", "6"), ("model.moe.expert-hidden", "64"),
            ("train.global-batch", "12"), ("train.micro-batch", "2"), ("train.steps", steps.ToString()), ("train.eval-every", "1000"));
        var args = TestSupport.SetArguments(settings);
        var reference = SingleProcessReference.Train(TestSupport.SmallConfig(settings.Select(kv => (kv.Key, kv.Value)).ToArray()), steps).Steps;
        int port = LoopbackPorts.Next();
        var metrics = Path.Combine(TestSupport.TempDir(), "metrics.jsonl");
        var coordinator = Start(["train", "--nodes", "0", "--expect-nodes", "3", "--port", port.ToString(), "--metrics", metrics,
            "--relayout", "8=2x2", .. args]);
        var seed = $"akka.tcp://elasticmoe@127.0.0.1:{port}";
        var nodes = new[] { "2", "1", "2" }.Select(t => Start(["node", "--seed-node", seed, .. args, "--threads", t])).ToArray();
        await RunMatchesTheLoop(coordinator, nodes, TimeSpan.FromMinutes(5), metrics, reference, "DP 3 x PP 1", "DP 1 x PP 2");
    }

    // The coordinator ends with 0 after every layout named, its metrics are the loop's bits, every node ends with 0.
    private async Task RunMatchesTheLoop(Process coordinator, Process[] nodes, TimeSpan timeout, string metrics, IReadOnlyList<ElasticMoE.Training.StepResult> reference, params string[] layouts)
    {
        try
        {
            var (code, text) = await Finish(coordinator, timeout);
            output.WriteLine(text);
            Assert.True(code == 0, text);
            foreach (var layout in layouts) Assert.Contains(layout, text);
            SingleProcessReference.AssertMetricsMatch(metrics, reference);
            foreach (var n in nodes)
            {
                var (nodeCode, nodeText) = await Finish(n, TimeSpan.FromSeconds(60));
                Assert.True(nodeCode == 0, nodeText);
            }
        }
        finally
        {
            foreach (var p in nodes.Append(coordinator))
                if (!p.HasExited) p.Kill(entireProcessTree: true);
        }
    }
}
