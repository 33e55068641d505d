using System.Diagnostics;
using ElasticMoE.Cli;
using ElasticMoE.Training;
using Xunit;

namespace ElasticMoE.Tests.Cluster;

/// <summary>A fact that xunit reports as skipped, with the reason, where test hosts (network namespaces) cannot be made.</summary>
public sealed class HostFactAttribute : FactAttribute
{
    public HostFactAttribute()
    {
        if (HostRack.Unavailable is { } reason) Skip = reason;
    }
}

/// <summary>
/// Real elasticmoe processes on test hosts (<see cref="HostRack"/>: network namespaces on a bridge, 10.231.0.x): a
/// coordinator on host 0 and a node on each of hosts 1-3, with faults a real network has — a pulled cable (silence, no
/// TCP reset), a host that can receive but not send and the reverse, packet loss and a bandwidth cap. Every run must
/// give the single-process loop's bits, each step committed exactly once, and end with the documented exit codes.
/// </summary>
[Collection("cluster")]
public sealed class HostTests
{
    // Tiny steps (~0.1 s): enough of them that a healed node has time to come back as a new incarnation and train.
    private const int Steps = 200;

    private static readonly Dictionary<string, string> Settings = TestSupport.SmallSettings(("seed", "5"), ("train.steps", Steps.ToString()),
        ("train.global-batch", "12"), ("train.micro-batch", "2"), ("train.eval-every", "1000"), ("cluster.redundancy", "1"),
        ("cluster.join-settle", "0.3"), ("cluster.coordinator-wait", "30"));

    private static readonly Lazy<IReadOnlyList<StepResult>> Reference =
        new(() => SingleProcessReference.Train(TestSupport.SmallConfig(Settings.Select(kv => (kv.Key, kv.Value)).ToArray()), Steps).Steps);

    private static string[] Program => ["dotnet", Path.Combine(AppContext.BaseDirectory, "elasticmoe.dll")];

    private sealed class Run : IDisposable
    {
        public HostRack Rack { get; } = new(4);
        public ProcessCluster Cluster { get; }
        public Stopwatch Clock { get; } = Stopwatch.StartNew();

        public Run()
        {
            Cluster = new ProcessCluster(TestSupport.TempDir(), ["--threads", "1", .. TestSupport.SetArguments(Settings)], Rack, Program);
            Cluster.StartCoordinator(3, Steps);
            for (int h = 1; h <= 3; h++) Cluster.StartNode(h);
            Wait(() => Cluster.Metrics.LastStep >= 1, "the first step");
        }

        public void Wait(Func<bool> done, string what) => Cluster.Wait(done, what, TimeSpan.FromSeconds(60), Clock, TimeSpan.FromMinutes(4));

        public ProcessCluster.Child NodeOn(int host) => Cluster.Nodes.Last(n => n.Host == host);

        /// <summary>Index of the node-lost line for the node on <paramref name="host"/>, once it is out.</summary>
        public int WaitLost(int host)
        {
            var address = NodeOn(host).Address ?? throw new InvalidOperationException($"no address for the node on host {host}");
            int at = -1;
            Wait(() => (at = Cluster.Metrics.Events.FindIndex(e => e.Kind == "node-lost" && e.Node == address)) >= 0, $"the loss of {address}");
            return at;
        }

        /// <summary>
        /// Waits for the node process on <paramref name="host"/> to be planned in again after event <paramref name="after"/>:
        /// as a new incarnation, so at a new address (another port) on the same host.
        /// </summary>
        public void WaitRejoined(int host, int after)
        {
            var old = NodeOn(host).Address!;
            var prefix = $"akka.tcp://elasticmoe@{HostRack.Address(host)}:";
            Wait(() => Cluster.Metrics.Events.Skip(after + 1).Any(e => e.Kind == "node-joined" && e.Node.StartsWith(prefix, StringComparison.Ordinal) && e.Node != old),
                $"the node on host {host} to come back as a new incarnation");
        }

        /// <summary>Waits for the end of the run and checks the curve, each step once, and every exit code.</summary>
        public void Finish()
        {
            var coordinator = Cluster.Coordinator!;
            Wait(() => !coordinator.Alive, "the end of the run");
            Cluster.StopAll(TimeSpan.FromSeconds(30));
            Cluster.Metrics.Poll();
            Assert.True(coordinator.Process.ExitCode == 0, $"coordinator exit {coordinator.Process.ExitCode}; see {coordinator.Log}");
            SingleProcessReference.AssertMetricsMatch(Cluster.Metrics.Path, Reference.Value);
            foreach (var n in Cluster.Nodes.Where(n => !n.Killed))
                Assert.True(n.Process.ExitCode == 0, $"{n.Name} on host {n.Host} exit {n.Process.ExitCode}; see {n.Log}");
        }

        public void Dispose()
        {
            Cluster.Dispose();
            Rack.Dispose();
        }
    }

    [HostFact]
    public void A_worker_host_cut_off_mid_run_the_majority_trains_on_and_the_healed_node_comes_back_as_a_new_incarnation()
    {
        _ = Reference.Value;
        using var run = new Run();
        run.Wait(() => run.Cluster.Metrics.LastStep >= 10, "step 10");
        run.Rack.Cut(3);
        int lost = run.WaitLost(3);
        // Long enough for the cut-off node's own detector and probes to give its coordinator up.
        Thread.Sleep(TimeSpan.FromSeconds(3));
        run.Rack.Heal(3);
        run.WaitRejoined(3, lost);
        run.Finish();
        // The cut-off node gave its coordinator up, kept its units and came back as a new incarnation after the heal.
        Assert.True(ProcessCluster.LogContains(run.NodeOn(3).Log, "(a new incarnation) joining"), $"see {run.NodeOn(3).Log}");
        Assert.Single(run.Cluster.Metrics.Events, e => e.Kind == "node-lost");
    }

    [HostFact]
    public void A_host_that_cannot_send_and_then_one_that_cannot_receive_are_each_lost_and_come_back()
    {
        _ = Reference.Value;
        using var run = new Run();
        run.Wait(() => run.Cluster.Metrics.LastStep >= 8, "step 8");
        run.Rack.DropOutgoing(2);
        int lost = run.WaitLost(2);
        Thread.Sleep(TimeSpan.FromSeconds(2));
        run.Rack.ClearDrops(2);
        run.WaitRejoined(2, lost);
        long back = run.Cluster.Metrics.LastStep;
        run.Wait(() => run.Cluster.Metrics.LastStep >= back + 3, "three steps with host 2 back");
        run.Rack.DropIncoming(1);
        lost = run.WaitLost(1);
        Thread.Sleep(TimeSpan.FromSeconds(2));
        run.Rack.ClearDrops(1);
        run.WaitRejoined(1, lost);
        run.Finish();
        Assert.Equal(2, run.Cluster.Metrics.Events.Count(e => e.Kind == "node-lost"));
    }

    [HostFact]
    public void Packet_loss_a_bandwidth_cap_and_saturated_cores_remove_no_node()
    {
        _ = Reference.Value;
        using var run = new Run();
        for (int h = 0; h < 4; h++)
        {
            run.Rack.Lose(h, 0.01);
            run.Rack.Cap(h, 100);
        }
        // Two spinning threads at normal priority: with the four elasticmoe processes, more runnable threads than cores.
        using var stop = new CancellationTokenSource();
        var burners = Enumerable.Range(0, 2).Select(_ => new Thread(() => { while (!stop.IsCancellationRequested) Thread.SpinWait(1000); }) { IsBackground = true }).ToList();
        burners.ForEach(t => t.Start());
        try
        {
            run.Finish();
        }
        finally
        {
            stop.Cancel();
        }
        Assert.DoesNotContain(run.Cluster.Metrics.Events, e => e.Kind is "node-lost" or "node-joined");
    }
}
