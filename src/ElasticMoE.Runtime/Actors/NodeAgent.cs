using Akka.Actor;
using Akka.Event;
using ElasticMoE.Configuration;
using ElasticMoE.Data;
using ElasticMoE.Runtime.DataPlane;
using ElasticMoE.Runtime.Hosting;
using ElasticMoE.Runtime.Protocol;
using ElasticMoE.Training;

namespace ElasticMoE.Runtime.Actors;

/// <summary>
/// One per node: opens a data-plane endpoint per device, spawns and supervises the node's device
/// workers, registers the node with the coordinator (retrying until answered) and relays the plan.
/// </summary>
public sealed class NodeAgent : ReceiveActor, IWithTimers
{
    private sealed record RetryRegistration;

    /// <summary>Local: hand this node's units over and get the coordinator's leave; answered with <see cref="LeaveGranted"/>.</summary>
    public sealed record HandOver;

    private readonly List<IActorRef> _handOverWaiters = new();

    private readonly ElasticMoEConfig _config;
    private readonly IActorRef _coordinator;
    private readonly TaskCompletionSource<RunOutcome> _stopped;
    private readonly ILoggingAdapter _log = Context.GetLogger();
    private readonly List<DataPlaneNode> _dataPlanes = new();
    private readonly List<IActorRef> _workers = new();
    private readonly string _address;
    // Cancelled as the node stops, so a stage or shard blocked on a dead peer lets go at once.
    private readonly CancellationTokenSource _stopping = new();
    private bool _accepted;
    private readonly string _runFingerprint;

    public ITimerScheduler Timers { get; set; } = null!;

    public NodeAgent(ElasticMoEConfig config, TextCorpus corpus, IActorRef coordinator, TaskCompletionSource<RunOutcome> stopped, Hosting.ComputeLoop? loop = null)
    {
        _config = config;
        _coordinator = coordinator;
        _stopped = stopped;
        _address = Akka.Cluster.Cluster.Get(Context.System).SelfAddress.ToString();
        _runFingerprint = TrainingState.RunFingerprint(config, corpus.Fingerprint);
        var log = _log;
        for (int d = 0; d < config.Cluster.Devices; d++)
        {
            var dp = DataPlaneNode.Start(new DataPlaneOptions
            {
                Host = config.Cluster.Host,
                NodeId = d,
                MaxFrameBytes = (long)config.Cluster.MaxFrameMb << 20,
                MaxBufferedBytesPerConnection = (long)config.Cluster.MaxFrameMb << 20,
            }.WithAkkaLog(log));
            _dataPlanes.Add(dp);
            // Only one stage per process can have the loop's thread: the first device's.
            _workers.Add(Context.ActorOf(DeviceWorker.Props(config, corpus, dp, _address, d, d == 0 ? loop : null, _stopping.Token), $"worker-{d}"));
        }
        Receive<RetryRegistration>(_ => Register());
        Receive<HandOver>(_ => OnHandOver());
        Receive<IElasticMoEMessage>(OnMessage);
        Receive<Akka.Cluster.ClusterEvent.UnreachableMember>(m => OnMemberLost(m.Member, "became unreachable"));
        Receive<Akka.Cluster.ClusterEvent.MemberRemoved>(m => OnMemberLost(m.Member, "left the cluster"));
    }

    // A node without its coordinator has nothing to do: stop rather than wait forever.
    private void OnMemberLost(Akka.Cluster.Member member, string what)
    {
        if (!member.HasRole(Hosting.ClusterNode.CoordinatorRole) || member.Address.ToString() == _address) return;
        _log.Error("coordinator {0} {1}; stopping this node", member.Address, what);
        _stopped.TrySetResult(new RunOutcome.CoordinatorLost(member.Address.ToString(), what));
        _stopping.Cancel();
        Context.Stop(Self);
    }

    public static Props Props(ElasticMoEConfig config, TextCorpus corpus, IActorRef coordinator, TaskCompletionSource<RunOutcome> stopped, Hosting.ComputeLoop? loop = null)
        => Akka.Actor.Props.Create(() => new NodeAgent(config, corpus, coordinator, stopped, loop));

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
            typeof(Akka.Cluster.ClusterEvent.UnreachableMember), typeof(Akka.Cluster.ClusterEvent.MemberRemoved));
        Register();
        Timers.StartPeriodicTimer("register", new RetryRegistration(), TimeSpan.FromSeconds(1));
    }

    private void Register()
    {
        if (_accepted) return;
        _coordinator.Tell(new RegisterNode(_address, _dataPlanes.Select(d => d.Endpoint).ToArray(), TrainingState.Fingerprint(_config.Model), _config.Seed,
            Akka.Cluster.Cluster.Get(Context.System).SelfUniqueAddress.Uid, _runFingerprint));
    }

    private void OnHandOver()
    {
        _handOverWaiters.Add(Sender);
        if (_handOverWaiters.Count == 1)
            _coordinator.Tell(new RequestLeave(_address, Akka.Cluster.Cluster.Get(Context.System).SelfUniqueAddress.Uid));
    }

    private void OnMessage(IElasticMoEMessage message)
    {
        switch (message)
        {
            case LeaveGranted m:
                _log.Info("coordinator granted the leave after step {0}: this node's units are handed over", m.Step);
                foreach (var w in _handOverWaiters) w.Tell(m);
                _handOverWaiters.Clear();
                break;
            case NodeAccepted:
                _accepted = true;
                Timers.Cancel("register");
                break;
            case NodeRefused m:
                _log.Error("coordinator refused this node: {0}", m.Reason);
                Timers.Cancel("register");
                _stopped.TrySetResult(new RunOutcome.Refused(m.Reason));
                Context.Stop(Self);
                break;
            case InstallPlan m:
                foreach (var w in _workers) w.Forward(m);
                break;
            case AbortAttempt m:
                foreach (var w in _workers) w.Forward(m);
                break;
            case Shutdown m:
                _stopped.TrySetResult(m.End switch
                {
                    RunEnd.Finished => new RunOutcome.Finished(),
                    RunEnd.Stopped => new RunOutcome.RunStopped(m.Reason),
                    _ => new RunOutcome.Failed(m.Reason),
                });
                _stopping.Cancel();
                Context.Stop(Self);
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
        foreach (var dp in _dataPlanes) dp.Dispose();
        _stopped.TrySetResult(new RunOutcome.Failed("the node stopped before its coordinator ended the run"));
    }
}
