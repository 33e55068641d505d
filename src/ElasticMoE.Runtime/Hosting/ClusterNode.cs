using Akka.Actor;
using Akka.Cluster;
using Akka.Cluster.Tools.Singleton;
using Akka.Configuration;
using ElasticMoE.Configuration;
using ElasticMoE.Data;
using ElasticMoE.Runtime.Actors;
using ElasticMoE.Runtime.Serialization;
using ElasticMoE.Training;

namespace ElasticMoE.Runtime.Hosting;

/// <summary>
/// One ActorSystem in the ElasticMoE cluster: a worker node (node agent, device workers), the
/// coordinator's host (the cluster singleton), or both. Real Akka.Remote TCP between systems, even in
/// one process, so a local cluster exercises exactly what separate machines would.
/// </summary>
public sealed class ClusterNode : IAsyncDisposable
{
    public const string SystemName = "elasticmoe";
    public const string CoordinatorRole = "coordinator";
    public const string WorkerRole = "worker";

    private readonly TaskCompletionSource<RunResult>? _result;
    private readonly TaskCompletionSource<string>? _stopped;

    public ActorSystem System { get; }
    public Address Address { get; }

    /// <summary>
    /// Completes when the run ends (coordinator hosts only): a result, or the run's failure. It also
    /// fails when this ActorSystem terminates first: a caller waiting on it must never wait forever.
    /// </summary>
    public Task<RunResult> Result => _result?.Task ?? throw new InvalidOperationException("this node does not host the coordinator");

    /// <summary>Completes with the reason when this node's agent stops (worker nodes only).</summary>
    public Task<string> Stopped => _stopped?.Task ?? throw new InvalidOperationException("this node hosts no workers");

    private ClusterNode(ElasticMoEConfig config, TextCorpus corpus, bool coordinator, bool worker, Address? join, TrainingReport? report, ComputeLoop? loop)
    {
        TorchSetup.Configure(config);
        var roles = new List<string>();
        if (coordinator) roles.Add(CoordinatorRole);
        if (worker) roles.Add(WorkerRole);
        System = ActorSystem.Create(SystemName, AkkaConfig(config, roles));
        if (loop is not null) ComputeLoopDispatcher.Register(System, loop);
        var cluster = Cluster.Get(System);
        Address = cluster.SelfAddress;
        if (join is null && config.Cluster.SeedNodes.Count > 0)
            cluster.JoinSeedNodes(config.Cluster.SeedNodes.Select(Address.Parse));
        else
            cluster.Join(join ?? Address);

        if (coordinator)
        {
            _result = new TaskCompletionSource<RunResult>(TaskCreationOptions.RunContinuationsAsynchronously);
            var coordinatorProps = TrainingCoordinator.Props(config, report ?? new TrainingReport(TextWriter.Null, null), _result);
            System.ActorOf(ClusterSingletonManager.Props(coordinatorProps, PoisonPill.Instance,
                ClusterSingletonManagerSettings.Create(System).WithRole(CoordinatorRole)), "coordinator");
            // The coordinator completes the result; if the system goes first (terminated by anyone, the
            // coordinator stopped with it), say so rather than leave the caller waiting forever. This
            // was half of why SIGTERM left `elasticmoe train` running: Akka's own SIGTERM hook
            // terminated the system, and the main thread waited on a result that could no longer come.
            var result = _result;
            System.WhenTerminated.ContinueWith(_ => result.TrySetException(
                new TrainingFailedException("the coordinator's actor system stopped before the run ended")), TaskScheduler.Default);
        }
        if (worker)
        {
            _stopped = new TaskCompletionSource<string>(TaskCreationOptions.RunContinuationsAsynchronously);
            var proxy = System.ActorOf(ClusterSingletonProxy.Props("/user/coordinator",
                ClusterSingletonProxySettings.Create(System).WithRole(CoordinatorRole)), "coordinator-proxy");
            System.ActorOf(NodeAgent.Props(config, corpus, proxy, _stopped, loop), "node");
        }
    }

    /// <summary>Starts a node. <paramref name="join"/>: a member to join (null = the configured seed nodes, else itself).</summary>
    /// <param name="loop">A compute loop the caller will serve (<see cref="ComputeLoop.RunUntil"/>) for the first worker's stage, or null.</param>
    public static ClusterNode Start(ElasticMoEConfig config, TextCorpus corpus, bool coordinator, bool worker, Address? join = null,
        TrainingReport? report = null, ComputeLoop? loop = null)
        => new(config, corpus, coordinator, worker, join, report, loop);

    public static Config AkkaConfig(ElasticMoEConfig config, IEnumerable<string> roles)
    {
        var c = config.Cluster;
        var hocon = $$"""
            akka {
              loglevel = WARNING
              stdout-loglevel = WARNING
              log-dead-letters = 0
              log-dead-letters-during-shutdown = off
              actor.provider = cluster
              remote.log-remote-lifecycle-events = off
              # Akka's own SIGTERM / ProcessExit hook would terminate the ActorSystems behind the run's
              # back (no final step, no result, a main thread waiting forever): the CLI owns signals.
              coordinated-shutdown.run-by-clr-shutdown-hook = off
              # Shutting down a node whose peers died must not hang on cluster phases that cannot finish.
              coordinated-shutdown.phases {
                cluster-leave.timeout = 3s
                cluster-exiting.timeout = 3s
                cluster-exiting-done.timeout = 3s
                cluster-shutdown.timeout = 3s
              }
              cluster.singleton-proxy {
                singleton-identification-interval = 200ms
                log-singleton-identification-failure = off
              }
              remote.dot-netty.tcp {
                hostname = "{{c.Host}}"
                port = {{c.Port}}
              }
              cluster {
                roles = [{{string.Join(", ", roles.Select(r => $"\"{r}\""))}}]
                log-info = off
                # A training run's members are few and known; down an unreachable one quickly so the
                # singleton moves and the run fails fast instead of hanging on a dead peer.
                downing-provider-class = "Akka.Cluster.SBR.SplitBrainResolverProvider, Akka.Cluster"
                split-brain-resolver.active-strategy = keep-oldest
                split-brain-resolver.stable-after = 5s
              }
            }
            elasticmoe-compute-dispatcher {
              type = PinnedDispatcher
            }
            """;
        var ours = ConfigurationFactory.ParseString(hocon);
        // An `akka` section in the user's config file wins over ours: transport tuning, TLS, logging.
        var merged = ours.WithFallback(ElasticMoESerialization.Config);
        return config.Raw.HasPath("akka") ? config.Raw.WithFallback(merged) : merged;
    }

    /// <summary>Leaves the cluster if it can, then terminates; never throws (shutting down saves nothing).</summary>
    public async ValueTask DisposeAsync()
    {
        var cluster = Cluster.Get(System);
        try
        {
            using var leave = new CancellationTokenSource(TimeSpan.FromSeconds(5));
            await cluster.LeaveAsync(leave.Token).ConfigureAwait(false);
        }
        catch (Exception) { /* a broken cluster cannot be left gracefully: terminate anyway */ }
        try
        {
            await System.Terminate().WaitAsync(TimeSpan.FromSeconds(20)).ConfigureAwait(false);
        }
        catch (TimeoutException) { /* the process is ending; its sockets close with it */ }
    }
}

/// <summary>
/// <c>elasticmoe train</c>'s default: the coordinator plus N worker nodes, each its own ActorSystem in
/// this process, talking real TCP on loopback.
/// </summary>
public static class LocalCluster
{
    /// <summary>
    /// Runs the cluster with the calling thread as the first worker's compute thread (see
    /// <see cref="ComputeLoop"/>): what <c>elasticmoe train</c> does on its otherwise idle main thread.
    /// </summary>
    public static RunResult Run(ElasticMoEConfig config, TextCorpus corpus, TrainingReport report, CancellationToken cancel = default)
    {
        var loop = new ComputeLoop();
        var run = RunAsync(config, corpus, report, cancel, loop);
        loop.RunUntil(run);
        return run.GetAwaiter().GetResult();
    }

    public static async Task<RunResult> RunAsync(ElasticMoEConfig config, TextCorpus corpus, TrainingReport report, CancellationToken cancel = default,
        ComputeLoop? loop = null)
    {
        await Task.Yield();   // let a caller that serves a compute loop start serving it
        int nodes = config.Cluster.Nodes;
        var members = new List<ClusterNode>();
        try
        {
            // Node 0 hosts the coordinator too (or alone when all workers are external processes).
            var first = ClusterNode.Start(config, corpus, coordinator: true, worker: nodes > 0, report: report, loop: loop);
            members.Add(first);
            var peerConfig = config with { Cluster = config.Cluster with { Port = 0 } };
            for (int i = 1; i < nodes; i++)
                members.Add(ClusterNode.Start(peerConfig, corpus, coordinator: false, worker: true, join: first.Address));
            if (nodes == 0) report.Info($"coordinator at {first.Address}; waiting for {config.Cluster.NodesToWaitFor} node(s)");
            return await first.Result.WaitAsync(cancel).ConfigureAwait(false);
        }
        finally
        {
            // Workers first, so the coordinator's host is the last to go.
            for (int i = members.Count - 1; i >= 0; i--)
            {
                try { await members[i].DisposeAsync().ConfigureAwait(false); }
                catch (Exception) { /* shutting down: nothing left to save */ }
            }
        }
    }
}
