using Akka.Actor;
using Akka.Event;
using ElasticMoE.Configuration;
using ElasticMoE.Data;
using ElasticMoE.Runtime.Engine;
using ElasticMoE.Runtime.Hosting;
using ElasticMoE.Runtime.Protocol;
using ElasticMoE.Training;

namespace ElasticMoE.Runtime.Actors;

/// <summary>
/// One per node incarnation: spawns and supervises the node's device workers over the node's resources
/// (data-plane endpoints and units, <see cref="NodeResources"/>), registers the node with the coordinator
/// (retrying until answered, with the units it still holds when an earlier incarnation lost its
/// coordinator) and relays the plan. When the coordinator is gone it stops, and the node's host decides
/// whether a new incarnation waits for the next one (<see cref="WorkerNodeHost"/>).
/// </summary>
public sealed class NodeAgent : ReceiveActor, IWithTimers
{
    private sealed record RetryRegistration;
    private sealed record CoordinatorProbed(Akka.Actor.Address Address, bool Dead);
    private sealed record WaitedInVain;

    /// <summary>Local: hand this node's units over and get the coordinator's leave; answered with <see cref="LeaveGranted"/>.</summary>
    public sealed record HandOver(double NoticeSeconds = 0);

    private readonly List<IActorRef> _handOverWaiters = new();

    private readonly ElasticMoEConfig _config;
    private IActorRef _suspects = ActorRefs.Nobody;
    private readonly IActorRef _coordinator;
    private readonly TaskCompletionSource<RunOutcome> _stopped;
    private readonly ILoggingAdapter _log = Context.GetLogger();
    private readonly NodeResources _resources;
    // The units this node still held when the incarnation started (after losing a coordinator), sent with
    // every registration; empty for a fresh node.
    private readonly HeldUnits[] _held;
    private readonly List<IActorRef> _workers = new();
    private readonly string _address;
    // Cancelled as the node stops, so a stage or shard blocked on a dead peer lets go at once.
    private readonly CancellationTokenSource _stopping = new();
    private bool _accepted;
    private readonly string _runFingerprint;

    public ITimerScheduler Timers { get; set; } = null!;

    public NodeAgent(ElasticMoEConfig config, TextCorpus corpus, IActorRef coordinator, TaskCompletionSource<RunOutcome> stopped, NodeResources resources,
        Hosting.ComputeLoop? loop = null)
    {
        _resources = resources;
        resources.UseLog(_log);
        // Read before any worker of this incarnation starts: nothing else touches the units until a plan comes.
        _held = resources.Contexts.Select(c => c.DescribeHeld()).OfType<HeldUnits>().ToArray();
        _config = config;
        _coordinator = coordinator;
        _stopped = stopped;
        _address = Akka.Cluster.Cluster.Get(Context.System).SelfAddress.ToString();
        _runFingerprint = TrainingState.RunFingerprint(config, corpus.Fingerprint);
        // Only one stage per process can have the loop's thread: the first device's.
        for (int d = 0; d < config.Cluster.Devices; d++)
            _workers.Add(Context.ActorOf(DeviceWorker.Props(config, corpus, resources, _address, d, d == 0 ? loop : null, _stopping.Token), $"worker-{d}"));
        Receive<RetryRegistration>(_ => Register());
        Receive<WaitedInVain>(_ =>
        {
            if (_accepted) return;
            var what = $"did not come back within {config.Cluster.CoordinatorWaitSeconds:F0} s (cluster.coordinator-wait)";
            _log.Error("no coordinator accepted this node: the one lost {0}; stopping this node", what);
            StopWith(new RunOutcome.CoordinatorLost(string.Join(", ", config.Cluster.SeedNodes), what) { WaitedInVain = true });
        });
        Receive<Akka.Remote.DisassociatedEvent>(m => ProbeCoordinator(m.RemoteAddress));
        Receive<CoordinatorProbed>(m =>
        {
            if (!m.Dead) return;
            var member = Akka.Cluster.Cluster.Get(Context.System).State.Members.FirstOrDefault(x => x.Address == m.Address);
            if (member is not null) OnMemberLost(member, "is gone (its connection closed and a reconnect was refused)");
        });
        Receive<HandOver>(OnHandOver);
        Receive<IElasticMoEMessage>(OnMessage);
        // Unreachable is a suspicion: the coordinator is lost only once the prober confirms it (no answer, or a refused
        // connect). A busy coordinator whose heartbeats are late answers, and is never downed by its nodes for it.
        Receive<Akka.Cluster.ClusterEvent.UnreachableMember>(m =>
        {
            if (m.Member.HasRole(Hosting.ClusterNode.CoordinatorRole)) _suspects.Tell(new SuspectProber.Suspect(m.Member.Address, m.Member.UniqueAddress.Uid));
        });
        Receive<Akka.Cluster.ClusterEvent.ReachableMember>(m => _suspects.Tell(new SuspectProber.Cleared(m.Member.Address)));
        Receive<SuspectProber.Confirmed>(m =>
        {
            var member = Akka.Cluster.Cluster.Get(Context.System).State.Members.FirstOrDefault(x => x.UniqueAddress.Uid == m.Uid && x.Address == m.Address);
            if (member is not null) OnMemberLost(member, m.What);
        });
        Receive<Akka.Cluster.ClusterEvent.MemberRemoved>(m =>
        {
            _suspects.Tell(new SuspectProber.Cleared(m.Member.Address));
            OnMemberLost(m.Member, "left the cluster");
        });
    }

    // A node incarnation without its coordinator has nothing to do: it stops, and its host starts the
    // next one to wait for a coordinator with the units (cluster.coordinator-wait), or ends the process.
    private void OnMemberLost(Akka.Cluster.Member member, string what)
    {
        if (!member.HasRole(Hosting.ClusterNode.CoordinatorRole) || member.Address.ToString() == _address) return;
        // A re-attaching incarnation not yet accepted is waiting for a coordinator anyway (bounded by
        // cluster.coordinator-wait): the dead one it may still see in a stand-by's cluster is not news.
        if (!_accepted && _held.Length > 0) return;
        _log.Warning("coordinator {0} {1}", member.Address, what);
        // Downed, so the members left (the other nodes, a stand-by coordinator) converge without it.
        Akka.Cluster.Cluster.Get(Context.System).Down(member.Address);
        StopWith(new RunOutcome.CoordinatorLost(member.Address.ToString(), what));
    }

    private void StopWith(RunOutcome outcome)
    {
        _stopped.TrySetResult(outcome);
        _stopping.Cancel();
        Context.Stop(Self);
    }

    // The coordinator's remoting connection closed: if its port now refuses connections, its process is
    // gone (a SIGKILL), and waiting ~4.5 s for the failure detector to agree would only delay recovery.
    private void ProbeCoordinator(Akka.Actor.Address address)
    {
        var cluster = Akka.Cluster.Cluster.Get(Context.System);
        if (!cluster.State.Members.Any(m => m.Address == address && m.HasRole(Hosting.ClusterNode.CoordinatorRole))) return;
        ConnectionProbe.RefusedAsync(address, TimeSpan.FromSeconds(1))
            .ContinueWith(t => new CoordinatorProbed(address, t.Result), TaskContinuationOptions.ExecuteSynchronously).PipeTo(Self);
    }

    public static Props Props(ElasticMoEConfig config, TextCorpus corpus, IActorRef coordinator, TaskCompletionSource<RunOutcome> stopped, NodeResources resources,
        Hosting.ComputeLoop? loop = null)
        => Akka.Actor.Props.Create(() => new NodeAgent(config, corpus, coordinator, stopped, resources, loop));

    // A device worker holds units (parameters and moments): restarting it would bring it back blank and
    // silently lose them. Stop it instead; the coordinator sees the failed step or plan and decides
    // (the elasticity issue re-creates it from its units' copies).
    protected override SupervisorStrategy SupervisorStrategy()
        => new OneForOneStrategy(localOnlyDecider: ex =>
        {
            _log.Error(ex, "device worker failed; stopped, not restarted with blank state");
            return Directive.Stop;
        });

    protected override void PreStart()
    {
        Akka.Cluster.Cluster.Get(Context.System).Subscribe(Self, Akka.Cluster.ClusterEvent.SubscriptionInitialStateMode.InitialStateAsEvents,
            typeof(Akka.Cluster.ClusterEvent.UnreachableMember), typeof(Akka.Cluster.ClusterEvent.ReachableMember), typeof(Akka.Cluster.ClusterEvent.MemberRemoved));
        Context.System.EventStream.Subscribe(Self, typeof(Akka.Remote.DisassociatedEvent));
        _suspects = Context.ActorOf(SuspectProber.Props(_config), "suspects");
        Register();
        Timers.StartPeriodicTimer("register", new RetryRegistration(), TimeSpan.FromSeconds(1));
        if (_held.Length > 0)
        {
            _log.Warning("this node lost its coordinator and still holds {0} unit(s) of plan {1}: waiting up to {2:F0} s for a coordinator to adopt them",
                _held.Sum(h => h.Units.Length), _held.Max(h => h.Epoch), _config.Cluster.CoordinatorWaitSeconds);
            Timers.StartSingleTimer("wait", new WaitedInVain(), TimeSpan.FromSeconds(_config.Cluster.CoordinatorWaitSeconds));
        }
    }

    private void Register()
    {
        if (_accepted) return;
        _coordinator.Tell(new RegisterNode(_address, _resources.DataPlanes.Select(d => d.Endpoint).ToArray(), TrainingState.Fingerprint(_config.Model), _config.Seed,
            Akka.Cluster.Cluster.Get(Context.System).SelfUniqueAddress.Uid, _runFingerprint) { Held = _held, ProcessId = Environment.ProcessId, FailureDomain = _config.Cluster.FailureDomain });
    }

    private void OnHandOver(HandOver m)
    {
        _handOverWaiters.Add(Sender);
        if (_handOverWaiters.Count == 1 && _leaveOrdered is null) RequestLeave(m.NoticeSeconds);
    }

    private void RequestLeave(double noticeSeconds = 0) => _coordinator.Tell(
        new RequestLeave(_address, Akka.Cluster.Cluster.Get(Context.System).SelfUniqueAddress.Uid) { NoticeSeconds = noticeSeconds });

    // `node leave` from the shell: the reason, once the coordinator ordered it; the node then stops when the leave is granted.
    private string? _leaveOrdered;

    private void OnMessage(IElasticMoEMessage message)
    {
        switch (message)
        {
            case LeaveGranted m:
                _log.Info("coordinator granted the leave after step {0}: this node's units are handed over", m.Step);
                foreach (var w in _handOverWaiters) w.Tell(m);
                _handOverWaiters.Clear();
                // Ordered to leave (the shell's `node leave`): stop, so that the node's host leaves the cluster and ends.
                if (_leaveOrdered is { } why) StopWith(new RunOutcome.RunStopped($"left the run after step {m.Step}: {why}; its units were handed over"));
                break;
            case NodeLeaveOrder m:
                _log.Info("the coordinator asks this node to leave: {0}", m.Reason);
                if (_leaveOrdered is null && _handOverWaiters.Count == 0) RequestLeave();
                _leaveOrdered ??= m.Reason;
                break;
            case NodeKillOrder m:
                FaultInjection.KillThisProcess($"{m.Reason}: killing this node's process (SIGKILL)");
                break;
            case NodeAccepted:
                _accepted = true;
                Timers.Cancel("register");
                Timers.Cancel("wait");
                break;
            case NodeRefused m:
                _log.Error("coordinator refused this node: {0}", m.Reason);
                Timers.Cancel("register");
                StopWith(new RunOutcome.Refused(m.Reason));
                break;
            case InstallPlan m:
                foreach (var w in _workers) w.Forward(m);
                break;
            case AbortAttempt m:
                foreach (var w in _workers) w.Forward(m);
                break;
            case Shutdown m:
                StopWith(m.End switch
                {
                    RunEnd.Finished => new RunOutcome.Finished(),
                    RunEnd.Stopped => new RunOutcome.RunStopped(m.Reason),
                    _ => new RunOutcome.Failed(m.Reason),
                });
                break;
            default:
                _log.Warning("node agent: unexpected {0}", message.GetType().Name);
                break;
        }
    }

    protected override void PostStop()
    {
        _stopping.Cancel();
        Akka.Cluster.Cluster.Get(Context.System).Unsubscribe(Self);
        Context.System.EventStream.Unsubscribe(Self);
        _stopped.TrySetResult(new RunOutcome.Failed("the node stopped before its coordinator ended the run"));
    }
}
