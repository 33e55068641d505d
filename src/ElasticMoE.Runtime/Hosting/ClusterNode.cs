using Akka.Actor;
using Akka.Cluster;
using Akka.Cluster.Tools.Singleton;
using Akka.Configuration;
using ElasticMoE.Configuration;
using ElasticMoE.Data;
using ElasticMoE.Runtime.Actors;
using ElasticMoE.Runtime.Protocol;
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
    private readonly TaskCompletionSource<RunOutcome>? _stopped;

    public ActorSystem System { get; }
    public Address Address { get; }

    /// <summary>
    /// Completes when the run ends (coordinator hosts only): a result, or the run's failure. It also
    /// fails when this ActorSystem terminates first: a caller waiting on it must never wait forever.
    /// </summary>
    public Task<RunResult> Result => _result?.Task ?? throw new InvalidOperationException("this node does not host the coordinator");

    /// <summary>Completes with how this node's part ended when its agent stops (worker nodes only).</summary>
    public Task<RunOutcome> Stopped => _stopped?.Task ?? throw new InvalidOperationException("this node hosts no workers");

    private ClusterNode(ElasticMoEConfig config, TextCorpus corpus, bool coordinator, bool worker, Address? join, TrainingReport? report, ComputeLoop? loop,
        NodeResources? resources)
    {
        TorchSetup.Configure(config);
        var roles = new List<string>();
        if (coordinator) roles.Add(CoordinatorRole);
        if (worker) roles.Add(WorkerRole);
        var akka = AkkaConfig(config, roles);
        // The coordinator's journal (Akka.Persistence.Sql): SQLite files in the run directory, or what an
        // `akka.persistence` section of the user's config says (hocon/postgres.conf).
        if (coordinator && config.RunDirectory is { } runDir)
            akka = config.Raw.HasPath("akka.persistence") ? akka.WithFallback(Journal.JournalConfig.WithOverlay(config.Raw, runDir))
                : akka.WithFallback(Journal.JournalConfig.Sqlite(runDir));
        try
        {
            System = ActorSystem.Create(SystemName, akka);
        }
        catch (Exception e) when (Inner(e).OfType<Akka.Remote.RemoteTransportException>().FirstOrDefault() is { } bind)
        {
            var c = config.Cluster;
            throw new ConfigException($"elasticmoe.cluster.host: cannot listen on {c.Host}:{c.Port} ({bind.Message.TrimEnd('.')}; " +
                $"{Inner(e).OfType<System.Net.Sockets.SocketException>().FirstOrDefault()?.Message ?? "see the log"}): it must be an address of this machine " +
                "and a free port; bind one that is (or \"0.0.0.0\") and put what peers dial in cluster.public-host");
        }
        if (loop is not null) ComputeLoopDispatcher.Register(System, loop);
        var cluster = Cluster.Get(System);
        Address = cluster.SelfAddress;
        // `actors tree` in the shell: every node answers for its own actors.
        System.ActorOf(ActorTreeProbe.Props(), ActorTreeProbe.Name);
        if (join is null && config.Cluster.SeedNodes.Count > 0)
            cluster.JoinSeedNodes(config.Cluster.SeedNodes.Select(Address.Parse));
        else
            cluster.Join(join ?? Address);

        if (coordinator)
        {
            _result = new TaskCompletionSource<RunResult>(TaskCreationOptions.RunContinuationsAsynchronously);
            // A coordinator host that joins an existing cluster is a stand-by: the singleton runs on the
            // oldest coordinator-role node, and moves here when that node is gone.
            bool standby = !worker && join is null && config.Cluster.SeedNodes.Count > 0;
            var coordinatorProps = TrainingCoordinator.Props(config, report ?? new TrainingReport(TextWriter.Null, null), _result,
                TrainingState.RunFingerprint(config, corpus.Fingerprint), config.RunDirectory, standby);
            if (standby) System.ActorOf(Props.Create<StandbyWatch>(), "standby-watch");
            System.ActorOf(ClusterSingletonManager.Props(coordinatorProps, PoisonPill.Instance,
                ClusterSingletonManagerSettings.Create(System).WithRole(CoordinatorRole)), "coordinator");
            // What `elasticmoe shell` talks to, on every coordinator-role node (stand-bys say where the coordinator runs).
            System.ActorOf(ShellEndpoint.Props(), ShellEndpoint.Name);
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
            _stopped = new TaskCompletionSource<RunOutcome>(TaskCreationOptions.RunContinuationsAsynchronously);
            var stopped = _stopped;
            System.WhenTerminated.ContinueWith(_ => stopped.TrySetResult(
                new RunOutcome.Failed("the node's actor system stopped before its coordinator ended the run")), TaskScheduler.Default);
            // Resources the caller does not keep across incarnations are this node's: gone with its system.
            if (resources is null)
            {
                var owned = resources = new NodeResources(config);
                System.WhenTerminated.ContinueWith(_ => owned.Dispose(), TaskScheduler.Default);
            }
            var proxy = System.ActorOf(ClusterSingletonProxy.Props("/user/coordinator",
                ClusterSingletonProxySettings.Create(System).WithRole(CoordinatorRole)), "coordinator-proxy");
            System.ActorOf(NodeAgent.Props(config, corpus, proxy, _stopped, resources, loop), "node");
        }
    }

    /// <summary>Starts a node. <paramref name="join"/>: a member to join (null = the configured seed nodes, else itself).</summary>
    /// <param name="loop">A compute loop the caller will serve (<see cref="ComputeLoop.RunUntil"/>) for the first worker's stage, or null.</param>
    /// <param name="resources">A worker node's data planes and units when they outlive this incarnation
    /// (<see cref="WorkerNodeHost"/>); null = the node's own, disposed when its system terminates.</param>
    public static ClusterNode Start(ElasticMoEConfig config, TextCorpus corpus, bool coordinator, bool worker, Address? join = null,
        TrainingReport? report = null, ComputeLoop? loop = null, NodeResources? resources = null)
        => new(config, corpus, coordinator, worker, join, report, loop, resources);

    // An exception and everything inside it (aggregates and inner exceptions), outermost first.
    private static IEnumerable<Exception> Inner(Exception e)
    {
        yield return e;
        var inner = e is AggregateException a ? a.InnerExceptions : e.InnerException is { } i ? [i] : (IEnumerable<Exception>)[];
        foreach (var x in inner)
            foreach (var y in Inner(x)) yield return y;
    }

    public static Config AkkaConfig(ElasticMoEConfig config, IEnumerable<string> roles)
    {
        var c = config.Cluster;
        var fd = config.FailureDetection;
        static string Ms(double seconds) => Math.Round(seconds * 1000).ToString(global::System.Globalization.CultureInfo.InvariantCulture);
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
                public-hostname = "{{c.AdvertisedHost}}"
                port = {{c.Port}}
              }
              cluster {
                roles = [{{string.Join(", ", roles.Select(r => $"\"{r}\""))}}]
                log-info = off
                # Who is downed when members become unreachable. keep-oldest on the coordinator role:
                # the side of a partition with the oldest coordinator-role member (the running
                # coordinator) keeps going and re-plans without the rest; every node on the other side
                # downs itself and stops, so a partition never leaves two coordinators driving steps
                # (keep-majority could: a 1-coordinator + 1-node side is a minority of 5 but is the
                # side with the run's state and driver). down-if-alone = off: a coordinator cut off
                # from every node keeps its journal and waits for nodes rather than downing itself.
                # stable-after 5 s suits a LAN (the failure detector has then seen ~5 missed heartbeats).
                # A SIGKILLed node does not wait for this: the coordinator sees its connection close,
                # confirms with a refused reconnect and downs it itself (see TrainingCoordinator).
                downing-provider-class = "Akka.Cluster.SBR.SplitBrainResolverProvider, Akka.Cluster"
                # How long the coordinator singleton waits after its node was removed before starting on a
                # stand-by (Akka's default: stable-after, 5 s, for a downed side that may still run its own
                # singleton). Only a coordinator node whose process is confirmed gone is ever downed here
                # (StandbyWatch: refused reconnect; keep-oldest never downs the oldest's side), so nothing can
                # still be running: measured, the stand-by then took over in ~1 s instead of ~6 s more.
                down-removal-margin = 500ms
                split-brain-resolver {
                  active-strategy = keep-oldest
                  stable-after = 5s
                  keep-oldest {
                    down-if-alone = off
                    role = "{{CoordinatorRole}}"
                  }
                }
                # cluster.failure-detection: suspicion only. The coordinator downs a suspect once a probe
                # confirms it silent (LivenessProbes), so a short pause costs no false removal under load;
                # the split-brain resolver still waits stable-after before downing anything by itself.
                # Was Akka's 1 s / 3 s: a silent host was found in 4.1-5.7 s.
                failure-detector {
                  heartbeat-interval = {{Ms(fd.HeartbeatInterval)}}ms
                  acceptable-heartbeat-pause = {{Ms(fd.AcceptablePause)}}ms
                  threshold = 8.0
                }
                # A graceful leave (a node's SIGTERM) takes a few gossip rounds and leader actions:
                # ~2 s at Akka's 1 s defaults, measured here; at 250 ms the signalled node is gone in
                # well under a second. A handful of members gossiping 4 times a second costs nothing.
                # How often a member's failure-detector verdicts become UnreachableMember events: Akka's 1 s
                # added up to a second to every silent loss (measured on test hosts: 2.2-2.5 s to detect a cut).
                unreachable-nodes-reaper-interval = 250ms
                gossip-interval = 250ms
                leader-actions-interval = 250ms
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

    /// <summary>
    /// Asks the coordinator hosted here to end the run early (<see cref="StopRun"/>): after the step in
    /// flight, or at once if none is. Idempotent; coordinator hosts only.
    /// </summary>
    public void RequestStop(string reason)
    {
        if (_result is null) throw new InvalidOperationException("this node does not host the coordinator");
        // The singleton's well-known path under its manager. Our coordinator role has one member, this
        // system, so the singleton is local (or not started yet: then the message is lost, and the
        // caller repeats it).
        System.ActorSelection("/user/coordinator/singleton").Tell(new StopRun(reason), ActorRefs.NoSender);
    }

    /// <summary>
    /// Asks the coordinator to take this node out of the run (worker nodes only): it re-plans without the
    /// node at the next step boundary and moves the node's units to workers that stay. True when the
    /// coordinator granted the leave within <paramref name="timeout"/>; false otherwise (then leaving
    /// still works, but the run stops, naming the node).
    /// </summary>
    public async Task<bool> HandOverAsync(TimeSpan timeout)
    {
        if (_stopped is null) throw new InvalidOperationException("this node hosts no workers");
        try
        {
            var agent = await System.ActorSelection("/user/node").ResolveOne(timeout).ConfigureAwait(false);
            // The coordinator is told how long it has (what is left of the timeout once the agent is found).
            await agent.Ask<LeaveGranted>(new NodeAgent.HandOver(timeout.TotalSeconds), timeout).ConfigureAwait(false);
            return true;
        }
        catch (Exception ex) when (ex is AskTimeoutException or ActorNotFoundException or TaskCanceledException or TimeoutException)
        {
            return false;
        }
    }

    /// <summary>Leaves the cluster if it can, then terminates; never throws (shutting down saves nothing).</summary>
    public ValueTask DisposeAsync() => new(ShutdownAsync(TimeSpan.FromSeconds(5), TimeSpan.FromSeconds(20)));

    /// <summary>
    /// Leaves the cluster gracefully (peers see "left", not "unreachable"), waiting at most
    /// <paramref name="leaveTimeout"/>, then terminates the ActorSystem, waiting at most
    /// <paramref name="terminateTimeout"/>. Never throws.
    /// </summary>
    /// <param name="leaveTimeout">Zero: no separate leave. Termination's coordinated shutdown still
    /// leaves the cluster, without this method waiting for the removal to complete first.</param>
    public async Task ShutdownAsync(TimeSpan leaveTimeout, TimeSpan terminateTimeout)
    {
        if (leaveTimeout > TimeSpan.Zero)
        {
            try
            {
                using var leave = new CancellationTokenSource(leaveTimeout);
                await Cluster.Get(System).LeaveAsync(leave.Token).ConfigureAwait(false);
            }
            catch (Exception) { /* a broken cluster cannot be left gracefully: terminate anyway */ }
        }
        try
        {
            await System.Terminate().WaitAsync(terminateTimeout).ConfigureAwait(false);
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
    /// After a stop request, how long the step in flight and the final parameter summary may take
    /// before the run is abandoned. A step of the default model takes ~0.12 s here, so this is ample,
    /// and with the teardown budgets below it keeps <c>elasticmoe train</c> under 5 s from signal to exit.
    /// </summary>
    public static readonly TimeSpan StopGrace = TimeSpan.FromSeconds(2);

    // Teardown after a stop request: every member terminated at once, with no separate leave first.
    // Measured on the 2-core box: a separate leave of the coordinator's host never completes (the last
    // member of a cluster cannot finish leaving it) and only burnt its whole timeout; termination runs
    // into this 1 s bound for the same reason, after the nodes have long had their Shutdown. Signal to
    // exit is then 1.2-1.3 s with 1 or 2 in-process nodes and 1.3-1.6 s with 2 external ones.
    private static readonly TimeSpan StopLeaveTimeout = TimeSpan.Zero;
    private static readonly TimeSpan StopTerminateTimeout = TimeSpan.FromSeconds(1);

    /// <summary>
    /// Runs the cluster with the calling thread as the first worker's compute thread (see
    /// <see cref="ComputeLoop"/>): what <c>elasticmoe train</c> does on its otherwise idle main thread.
    /// </summary>
    public static RunResult Run(ElasticMoEConfig config, TextCorpus corpus, TrainingReport report, Task<string>? stopRequested = null)
    {
        var loop = new ComputeLoop();
        var run = RunAsync(config, corpus, report, stopRequested, loop);
        loop.RunUntil(run);
        return run.GetAwaiter().GetResult();
    }

    /// <param name="stopRequested">Completes, with the reason ("SIGTERM"), when the run should end early:
    /// the coordinator is sent <see cref="StopRun"/> and the result comes back marked as stopped; if
    /// the step in flight does not commit within <see cref="StopGrace"/>, the run is abandoned with a
    /// <see cref="TrainingFailedException"/>. Either way the nodes are then torn down on short timeouts.</param>
    public static async Task<RunResult> RunAsync(ElasticMoEConfig config, TextCorpus corpus, TrainingReport report, Task<string>? stopRequested = null,
        ComputeLoop? loop = null)
    {
        await Task.Yield();   // let a caller that serves a compute loop start serving it
        int nodes = config.Cluster.Nodes;
        var members = new List<ClusterNode>();
        bool stopping = false;
        try
        {
            // Node 0 hosts the coordinator too (or alone when all workers are external processes).
            var first = ClusterNode.Start(config, corpus, coordinator: true, worker: nodes > 0, report: report, loop: loop);
            members.Add(first);
            var peerConfig = config with { Cluster = config.Cluster with { Port = 0 } };
            for (int i = 1; i < nodes; i++)
                members.Add(ClusterNode.Start(peerConfig, corpus, coordinator: false, worker: true, join: first.Address));
            if (nodes == 0 && config.Cluster.SeedNodes.Count > 0)
            {
                var seeds = string.Join(", ", config.Cluster.SeedNodes);
                report.Info($"stand-by coordinator at {first.Address}, joining {seeds}");
                Cluster.Get(first.System).RegisterOnMemberUp(() =>
                    report.Info($"stand-by coordinator is up in the cluster of {seeds}: it takes the run over if that coordinator's node dies"));
            }
            else if (nodes == 0) report.Info($"coordinator at {first.Address}; waiting for {config.Cluster.NodesToWaitFor} node(s)");
            var result = first.Result;
            if (stopRequested is not null && await Task.WhenAny(result, stopRequested).ConfigureAwait(false) != result)
            {
                stopping = true;
                string reason = await stopRequested.ConfigureAwait(false);
                var deadline = System.Diagnostics.Stopwatch.StartNew();
                // Repeated until answered: a coordinator that has not started yet would lose the first.
                while (!result.IsCompleted && deadline.Elapsed < StopGrace)
                {
                    first.RequestStop(reason);
                    var wait = TimeSpan.FromMilliseconds(Math.Min(250, Math.Max(1, (StopGrace - deadline.Elapsed).TotalMilliseconds)));
                    await Task.WhenAny(result, Task.Delay(wait)).ConfigureAwait(false);
                }
                if (!result.IsCompleted)
                    throw new TrainingFailedException($"the step in flight did not commit within {StopGrace.TotalSeconds:F1} s of the stop request and was abandoned");
            }
            return await result.ConfigureAwait(false);
        }
        finally
        {
            if (stopping)
            {
                // All at once on short timeouts: the process has promised to exit within seconds.
                await Task.WhenAll(members.Select(m => m.ShutdownAsync(StopLeaveTimeout, StopTerminateTimeout))).ConfigureAwait(false);
            }
            else
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
}
