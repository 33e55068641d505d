using ElasticMoE.Configuration;
using ElasticMoE.Data;
using ElasticMoE.Runtime.Actors;
using ElasticMoE.Runtime.Hosting;
using ElasticMoE.Runtime.Protocol;
using ElasticMoE.Training;
using Xunit.Abstractions;
using static ElasticMoE.Tests.Cluster.ShellTests;

namespace ElasticMoE.Tests.Cluster;

/// <summary>
/// r mirrors in a running cluster (in-process nodes on loopback TCP): several nodes lost at one step boundary,
/// with no plan between them (the shell's <c>node-down</c> of several nodes: each is downed in the cluster, as a
/// dead node would be, and its state counts as gone), lose nothing when they are at most r, or one whole failure
/// domain; the curve stays bit for bit the single-process loop's. The run is held at boundaries (train pause)
/// so that which step each loss lands on never depends on timing.
/// </summary>
[Collection("cluster")]
public class MirrorRecoveryTests(ITestOutputHelper output)
{
    private static ElasticMoEConfig Config(int nodes, int steps, int redundancy) => TestSupport.SmallConfig(
        ("seed", "1"), ("model.layers", "3"), ("model.moe.routed-experts", "6"),
        ("train.global-batch", "12"), ("train.micro-batch", "2"), ("train.steps", steps.ToString()), ("train.eval-every", steps.ToString()),
        ("train.eval-batches", "1"), ("cluster.nodes", "0"), ("cluster.expected-nodes", nodes.ToString()), ("cluster.pipeline-stages", "1"),
        ("cluster.redundancy", redundancy.ToString()), ("cluster.join-settle", "0"), ("cluster.checksum-every", "1"), ("shell.token", Token));

    /// <summary>A coordinator-only node and worker nodes started one by one (each with its own failure domain if given).</summary>
    private sealed class Nodes : IAsyncDisposable
    {
        private readonly TextCorpus _corpus;
        private readonly List<ClusterNode> _all = new();
        public ElasticMoEConfig Config { get; }
        public ConsoleCapture Console { get; } = new();
        public TrainingReport Report { get; }
        public List<StepResult> Reported { get; } = new();
        public ClusterNode Coordinator { get; }
        public List<ClusterNode> Workers { get; } = new();
        public Action<StepResult>? OnStep { get; set; }
        public int Port => Coordinator.Address.Port!.Value;

        public Nodes(ElasticMoEConfig config)
        {
            Config = config;
            Report = new TrainingReport(Console, null);
            Report.StepReported += r =>
            {
                lock (Reported) Reported.Add(r);
                OnStep?.Invoke(r);
            };
            _corpus = TextCorpus.Default(config.Data.ValidationFraction, config.Model.Context);
            Coordinator = ClusterNode.Start(config, _corpus, coordinator: true, worker: false, report: Report);
            _all.Add(Coordinator);
        }

        public ClusterNode Start(string? domain = null)
        {
            var cfg = Config with { Cluster = Config.Cluster with { Port = 0, FailureDomain = domain } };
            var node = ClusterNode.Start(cfg, _corpus, coordinator: false, worker: true, join: Coordinator.Address);
            _all.Add(node);
            return node;
        }

        public int StepCount { get { lock (Reported) return Reported.Count; } }

        public ITestOutputHelper? Output { get; set; }

        public async ValueTask DisposeAsync()
        {
            Output?.WriteLine(Console.Text);
            for (int i = _all.Count - 1; i >= 0; i--)
            {
                try { await _all[i].DisposeAsync(); }
                catch (Exception) { /* a downed node may have shut itself down already */ }
            }
            Report.Dispose();
        }
    }

    private static string HostPort(ClusterNode n) => $"{n.Address.Host}:{n.Address.Port}";

    private static async Task<ShellPlan> PlanOf(ShellClient client, int worldSize, Nodes run)
    {
        var deadline = DateTime.UtcNow + Long;
        while (true)
        {
            if (await client.AskAsync(new ShellPlanQuery()) is ShellPlan p && p.WorldSize == worldSize) return p;
            Assert.True(DateTime.UtcNow < deadline, $"no plan of {worldSize} workers came\n{run.Console.Text}");
            await Task.Delay(50);
        }
    }

    private static async Task WorkersPresent(ShellClient client, int count, Nodes run)
    {
        var deadline = DateTime.UtcNow + Long;
        while (!(await client.AskAsync(new ShellWorkersQuery()) is ShellWorkers w && w.Workers.Length == count))
        {
            Assert.True(DateTime.UtcNow < deadline, $"{count} workers never registered\n{run.Console.Text}");
            await Task.Delay(50);
        }
    }

    /// <summary>Held before step 1 with <paramref name="domains"/>.Length worker nodes planned in.</summary>
    private static async Task<ShellClient> HeldAtStart(Nodes run, string?[] domains)
    {
        var client = await ShellClient.ConnectAsync($"127.0.0.1:{run.Port}", TimeSpan.FromSeconds(30));
        await PauseOnceStarted(client, () => run.Console.Text);
        foreach (var d in domains) run.Workers.Add(run.Start(d));
        await WaitPaused(client);
        await PlanOf(client, domains.Length, run);
        Assert.Equal(0, run.StepCount);
        return client;
    }

    /// <summary>Resumes for one step or more and holds again at a boundary.</summary>
    private static async Task OneStep(ShellClient client, Nodes run)
    {
        int before = run.StepCount;
        run.OnStep = r => { if (r.Step >= before) _ = client.AskAsync(new ShellControl("pause", Token)); };
        Assert.True(Ack(await client.AskAsync(new ShellControl("resume", Token))).Ok);
        var deadline = DateTime.UtcNow + Long;
        while (run.StepCount <= before)
        {
            Assert.True(DateTime.UtcNow < deadline, $"no step after {before}\n{run.Console.Text}");
            await Task.Delay(20);
        }
        await WaitPaused(client);
        run.OnStep = null;
    }

    private static async Task<RunResult> Finish(ShellClient client, Nodes run)
    {
        Assert.True(Ack(await client.AskAsync(new ShellControl("resume", Token))).Ok);
        return await run.Coordinator.Result.WaitAsync(Long);
    }

    [Fact]
    public async Task Redundancy_2_with_five_nodes_loses_nothing_when_any_two_go_at_once_every_pair_tried()
    {
        const int steps = 26;
        var cfg = Config(5, steps, 2);
        var reference = SingleProcessReference.Train(cfg, steps).Steps;
        await using var run = new Nodes(cfg) { Output = output };
        await using var client = await HeldAtStart(run, new string?[5]);
        await OneStep(client, run);
        int pairs = 0;
        for (int i = 0; i < 5; i++)
            for (int j = i + 1; j < 5; j++)
            {
                // Positions i and j of the five: downed together, then replaced by two fresh nodes and planned back to five.
                var ack = Ack(await client.AskAsync(new ShellControlCommand("node-down", [HostPort(run.Workers[i]), HostPort(run.Workers[j])], Token)));
                Assert.True(ack.Ok, ack.Message);
                await WaitPaused(client);
                await PlanOf(client, 3, run);
                run.Workers[i] = run.Start();
                run.Workers[j] = run.Start();
                await WorkersPresent(client, 5, run);
                var relayout = Ack(await client.AskAsync(new ShellControlCommand("relayout", ["5", "1"], Token)));
                Assert.True(relayout.Ok, relayout.Message);
                await WaitPaused(client);
                var plan = await PlanOf(client, 5, run);
                Assert.Equal(2, plan.Redundancy);
                if (run.StepCount < steps - 3) await OneStep(client, run);
                pairs++;
            }
        Assert.Equal(10, pairs);
        var result = await Finish(client, run);
        Assert.Equal(steps, result.Steps.Count);
        Assert.Equal(0, result.RedoneAttempts);   // every loss landed on a held boundary: no step in flight
        SingleProcessReference.AssertStepsIdentical("redundancy 2, every pair of five lost at once", result.Steps, reference);
        Assert.Contains("2 mirror(s) per unit", run.Console.Text);
        Assert.DoesNotContain("no holder left", run.Console.Text);
    }

    [Fact]
    public async Task Two_domains_of_two_nodes_with_one_mirror_lose_nothing_when_a_whole_domain_goes()
    {
        const int steps = 6;
        var cfg = Config(4, steps, 1);
        var reference = SingleProcessReference.Train(cfg, steps).Steps;
        await using var run = new Nodes(cfg) { Output = output };
        // Interleaved so that workers of one domain sit next to each other in rank order: a plain next-rank
        // buddy would share its domain; the domain-aware keeper must not.
        await using var client = await HeldAtStart(run, ["rack-a", "rack-a", "rack-b", "rack-b"]);
        await OneStep(client, run);
        var ack = Ack(await client.AskAsync(new ShellControlCommand("node-down", [HostPort(run.Workers[0]), HostPort(run.Workers[1])], Token)));
        Assert.True(ack.Ok, ack.Message);
        await WaitPaused(client);
        await PlanOf(client, 2, run);
        await OneStep(client, run);
        var result = await Finish(client, run);
        Assert.Equal(steps, result.Steps.Count);
        SingleProcessReference.AssertStepsIdentical("redundancy 1 over two domains, one domain lost", result.Steps, reference);
        Assert.Contains("across 2 failure domain(s)", run.Console.Text);
    }
}
