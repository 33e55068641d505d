using Akka.Actor;
using Akka.Event;
using ElasticMoE.Configuration;
using ElasticMoE.Planning;
using ElasticMoE.Runtime.Coordination;
using ElasticMoE.Runtime.Engine;
using ElasticMoE.Runtime.Hosting;
using ElasticMoE.Runtime.Journal;
using ElasticMoE.Runtime.Protocol;
using ElasticMoE.State;
using ElasticMoE.Training;

namespace ElasticMoE.Runtime.Actors;

/// <summary>How a distributed run ended: the same figures the single-process loop reports, plus its plans.</summary>
/// <param name="FinalParameters">Per parameter name: (sum, L2 norm) at the end, from the replica-0 owner.</param>
/// <param name="StoppedBy">The reason of the <see cref="StopRun"/> that ended the run early, else null. Steps
/// then holds every step that committed, and FinalParameters are those after the last of them.</param>
/// <param name="StoppedBy">The reason of the <see cref="StopRun"/> that ended the run early, else null. Steps
/// then holds every step that committed, and FinalParameters are those after the last of them.</param>
public sealed record RunResult(
    IReadOnlyList<StepResult> Steps,
    IReadOnlyList<(long Step, double ValLoss)> Validation,
    double Seconds,
    IReadOnlyDictionary<string, (double Sum, double Norm)> FinalParameters,
    string? StoppedBy = null)
{
    /// <summary>Every plan installed, in order, with what it cost and which actors served it.</summary>
    public IReadOnlyList<PlanRecord> Plans { get; init; } = [];

    /// <summary>Step attempts redone after an abort or a fault (roll-forwards of an update included).</summary>
    public int RedoneAttempts { get; init; }
}

/// <summary>One installed plan: when, its layout, what moved, how long the install paused training, and the actors of each rank.</summary>
/// <param name="InstallSeconds">From sending the plan to the last worker's PlanInstalled (units moved and verified, engines rebuilt).</param>
/// <param name="GapSeconds">From the last step committed under the previous plan to the first committed under this one: the
/// re-plan pause plus one step (NaN for the first plan, or until that step commits).</param>
public sealed record PlanRecord(int Epoch, long AtStep, int Dp, int Pp, IReadOnlyList<UnitId> MovedUnits, long BytesMoved, double InstallSeconds,
    IReadOnlyList<(WorkerId Worker, IActorRef DeviceWorker, IActorRef Stage)> Ranks)
{
    public int UnitsMoved => MovedUnits.Count;
    public double GapSeconds { get; init; } = double.NaN;

    /// <summary>The plan itself (layout, expert copies), for figures computed from it afterwards.</summary>
    public TrainingPlan? Plan { get; init; }
}

/// <summary>
/// The cluster singleton that owns the plan and drives steps. States (each an explicit <c>Become</c>):
/// waiting for nodes → installing a plan → computing (forward, backward, dense all-reduce on every stage)
/// → expert norms (shards other workers call) → updating → [evaluating] → next step, re-plan or finishing.
/// Every step attempt is fenced by (epoch, step, attempt); a failure in any phase aborts the attempt
/// everywhere and redoes the step from unchanged state (an interrupted update is rolled forward instead:
/// units record the step they applied). Durable facts change only through <see cref="CoordinatorState.Apply"/>.
/// </summary>
public sealed partial class TrainingCoordinator : ReceiveActor, IWithTimers, IWithUnboundedStash
{
    private sealed record PhaseTimeout(Fence Fence, string Phase);

    /// <summary>Attempts per step before the run gives up (the tag space carries the attempt mod 16).</summary>
    public const int MaxAttemptsPerStep = 8;

    private readonly ElasticMoEConfig _config;
    private readonly TrainingReport _report;
    private readonly TaskCompletionSource<RunResult> _done;
    private readonly ILoggingAdapter _log = Context.GetLogger();
    private readonly string _runFingerprint;
    private readonly Queue<RelayoutPoint> _schedule;
    private RequestRelayout? _requested;
    // Confirms the failure detector's suspicions before a node is lost (a child: it dies with the coordinator).
    private IActorRef _suspects = ActorRefs.Nobody;

    private CoordinatorState _state = CoordinatorState.Empty;
    private readonly List<(string Address, long Uid, IActorRef Agent)> _agents = new();

    // The installed plan's actors, by rank.
    private readonly Dictionary<int, IActorRef> _stages = new();
    private readonly Dictionary<int, IActorRef> _workerRefs = new();
    private readonly List<(int Rank, int Ordinal, IActorRef Shard)> _sharedShards = new();
    private readonly List<IActorRef> _allWorkers = new();
    // Mirror keepers of the installed plan, by rank (redundancy): they take part in steps and updates.
    private readonly List<(int Rank, IActorRef Keeper)> _mirrors = new();

    // Workers lost since the plan in force was installed: their state is gone, the next plan must not
    // count on them (TransferPlanner takes their units from copies and mirrors).
    private readonly HashSet<WorkerId> _gone = new();
    // Membership changes to report at the next committed step, when their recovery time is known.
    private readonly List<MembershipChange> _membershipEvents = new();
    // Epochs only grow, also across installs abandoned for a newer plan, so no two plans share one.
    private int _lastEpoch;
    private enum Phase { Recovering, WaitingForNodes, RollingBack, Installing, Rebalancing, Retrying, Computing, Norms, Updating, Evaluating, Finishing, WaitingForWorkers, Done }
    private Phase _phase = Phase.WaitingForNodes;
    // What to do once the plan that recovers from a loss is installed: the interrupted evaluation or finish, or a step.
    private enum AfterInstall { Step, Evaluate, Finish }
    private AfterInstall _afterInstall = AfterInstall.Step;

    private Fence _fence;
    private int _computeAttempt;
    private int _redone;
    private readonly System.Diagnostics.Stopwatch _clock = new();
    private System.Diagnostics.Stopwatch _stepClock = new();
    private readonly Dictionary<int, StepComputed> _computed = new();
    private readonly Dictionary<(int, int), ExpertNorm> _norms = new();
    // By sender: a stage and a shard of one worker report the same rank, and a duplicate must not count twice.
    private readonly Dictionary<IActorRef, UpdateApplied> _applied = new();
    private readonly Dictionary<int, EvalComputed> _evals = new();
    private readonly List<(long, double)> _validation = new();
    private readonly List<PlanRecord> _plans = new();
    private StepResult? _pendingResult;
    private ApplyUpdate? _pendingUpdate;
    private bool _finished;

    public ITimerScheduler Timers { get; set; } = null!;
    public IStash Stash { get; set; } = null!;
    // ELASTICMOE_TRACE=1 logs each step's phase timings (with akka.loglevel = INFO).
    private static readonly bool Trace = Environment.GetEnvironmentVariable("ELASTICMOE_TRACE") == "1";
    private double _tCompute, _tNorm;

    /// <param name="runDir">The run directory (journal and checkpoints), or null for a run that persists nothing.</param>
    /// <param name="standby">Started on a stand-by coordinator's node (it took the singleton over): a run its
    /// journal says has ended is not resumed.</param>
    public TrainingCoordinator(ElasticMoEConfig config, TrainingReport report, TaskCompletionSource<RunResult> done, string runFingerprint, long startStep = 0,
        string? runDir = null, bool standby = false)
    {
        _standby = standby;
        _config = config;
        _report = report;
        _done = done;
        _runFingerprint = runFingerprint;
        _joinSettle = new Coordination.JoinSettle(config.Cluster.JoinSettleSeconds);
        _leaveSettle = new Coordination.JoinSettle(config.Cluster.LeaveSettleSeconds);
        _faults = FaultInjection.Parse(config.Cluster.FaultInjection);
        _schedule = new Queue<RelayoutPoint>(string.IsNullOrWhiteSpace(config.Cluster.Relayout) ? []
            : RelayoutSchedule.Parse(config.Cluster.Relayout).Where(p => p.Step >= startStep));
        _runDir = runDir is null ? null : Path.GetFullPath(runDir);
        if (_runDir is null)
        {
            Apply(new RunStarted(runFingerprint, config.Seed, startStep));
            WaitingForNodes();
        }
        else
        {
            _phase = Phase.Recovering;
            Recovering();
        }
    }

    public static Props Props(ElasticMoEConfig config, TrainingReport report, TaskCompletionSource<RunResult> done, string runFingerprint, string? runDir = null,
        bool standby = false)
        => Akka.Actor.Props.Create(() => new TrainingCoordinator(config, report, done, runFingerprint, 0, runDir, standby));

    // Every durable fact goes through here: into the state now, and into the journal (with --run-dir),
    // which appends in order; a restarted coordinator rebuilds the state from it.
    private void Apply(ICoordinatorEvent e)
    {
        _state = _state.Apply(e);
        Journal(e);
    }

    private void Enter(Phase phase, Action behaviour)
    {
        // Step timing watches a step from its first attempt's start (StartAttempt) to its commit; anything else ends it.
        if (phase is not (Phase.Computing or Phase.Norms or Phase.Updating)) _suspects.Tell(new SuspectProber.StepEnded(double.NaN));
        _phase = phase;
        Become(behaviour);
    }

    // Two detectors of a lost node: Akka's failure detector (UnreachableMember, seconds: it must tell a
    // slow node from a dead one), and the remoting connection itself (DisassociatedEvent, at once: a
    // killed process's sockets are closed by its kernel), which a refused reconnect then confirms.
    protected override void PreStart()
    {
        Akka.Cluster.Cluster.Get(Context.System).Subscribe(Self, Akka.Cluster.ClusterEvent.SubscriptionInitialStateMode.InitialStateAsEvents,
            typeof(Akka.Cluster.ClusterEvent.UnreachableMember), typeof(Akka.Cluster.ClusterEvent.ReachableMember),
            typeof(Akka.Cluster.ClusterEvent.MemberRemoved), typeof(Akka.Cluster.ClusterEvent.MemberLeft));
        _suspects = Context.ActorOf(SuspectProber.Props(_config, stepTiming: true), "suspects");
        Context.System.EventStream.Subscribe(Self, typeof(Akka.Remote.DisassociatedEvent));
        StartRebalancer();
        if (_runDir is not null) StartJournal();
    }

    protected override void PostStop()
    {
        Context.System.EventStream.Unsubscribe(Self);
        Akka.Cluster.Cluster.Get(Context.System).Unsubscribe(Self);
        _done.TrySetException(new TrainingFailedException("the coordinator stopped before the run finished"));
    }

    // ---- handlers common to every state --------------------------------------------------------

    private void Common()
    {
        ShellQueries();
        RebalanceReplies();
        ShellReadQueries();
        ShellControls();
        JournalReplies();
        // Unreachable is a suspicion: the prober confirms it (no answer, or a refused connect) before the node is lost.
        Receive<Akka.Cluster.ClusterEvent.UnreachableMember>(m => _suspects.Tell(new SuspectProber.Suspect(m.Member.Address, m.Member.UniqueAddress.Uid)));
        Receive<Akka.Cluster.ClusterEvent.ReachableMember>(m => _suspects.Tell(new SuspectProber.Cleared(m.Member.Address)));
        Receive<SuspectProber.Confirmed>(m => OnMemberLost(m.Address, m.Uid, m.What));
        Receive<Akka.Cluster.ClusterEvent.MemberRemoved>(m =>
        {
            _suspects.Tell(new SuspectProber.Cleared(m.Member.Address));
            OnMemberLost(m.Member.Address, m.Member.UniqueAddress.Uid, "left the cluster");
        });
        // A graceful leave (a node's SIGTERM) shows first as Leaving: stop then, before the node's
        // cancelled step could be reported as a worker failure under a misleading reason.
        Receive<Akka.Cluster.ClusterEvent.MemberLeft>(m => OnMemberLost(m.Member.Address, m.Member.UniqueAddress.Uid, "left the cluster"));
        Receive<Akka.Remote.DisassociatedEvent>(m => ProbeNode(m.RemoteAddress));
        Receive<NodeProbed>(OnNodeProbed);
        Receive<RegisterNode>(OnRegisterNode);
        Receive<WorkerRetired>(OnWorkerRetired);
        Receive<RequestRelayout>(m =>
        {
            _requested = m;
            _report.Info($"re-layout to {m.Workers} worker(s) x PP {m.Pp} requested; it takes effect at the next step boundary");
        });
        Receive<PhaseTimeout>(OnPhaseTimeout);
        Receive<RequestLeave>(OnRequestLeave);
        // Outside computing, norms and update no attempt is in flight (evaluation, install, waiting).
        Receive<RequestAbort>(m => _report.Info($"abort requested ({m.Reason}), but no step attempt is in flight; nothing to abort"));
        Receive<StopRun>(m =>
        {
            _stopRequested ??= m.Reason;
            if (_finished) return;
            if (_state.Plan is null) Finish();   // nothing trained yet: stop at once
            else if (_waitingFor is not null)
            {
                // Paused for workers: no step is in flight, so the run can end now.
                _waitingFor = null;
                Timers.Cancel("wait");
                Finish();
            }
        });
        Receive<IElasticMoEMessage>(m => { /* a stale or unexpected message for this state: fenced out */ });
    }

    private string? _stopRequested;

    private sealed record NodeProbed(Address Address, long Uid, bool Dead);

    /// <summary>
    /// A join, leave or loss waiting for the next committed step, when its recovery time is known: from
    /// <see cref="Since"/> (detection, or the join/leave request) to the install of the plan that took it into
    /// account (replan = before the install started, install = the unit transfers) and on to the commit (redo).
    /// </summary>
    private sealed class MembershipChange(string kind, string node, long step, System.Diagnostics.Stopwatch since)
    {
        public string Kind { get; } = kind;
        public string Node { get; } = node;
        public long Step { get; } = step;
        public System.Diagnostics.Stopwatch Since { get; } = since;
        public double DetectedUnix { get; } = DateTimeOffset.UtcNow.ToUnixTimeMilliseconds() / 1000.0 - since.Elapsed.TotalSeconds;
        public (double Before, double Install, double InstalledAt)? Installed { get; set; }
    }

    // A closed remoting connection is a hint, not a verdict (a connection can drop and come back): the
    // node counts as lost only if a fresh TCP connection to it is refused, which for a killed process on
    // a reachable host takes a millisecond. A timeout proves nothing; the failure detector decides then.
    // True when a probe was started (its NodeProbed will come, within the probe's timeout).
    private bool ProbeNode(Address address)
    {
        if (_finished || address.Host is null || address.Port is null) return false;
        var node = address.ToString();
        var uid = _agents.Where(a => a.Address == node).Select(a => a.Uid).FirstOrDefault();
        if (uid == 0) return false;
        ConnectionProbe.RefusedAsync(address, ProbeTimeout)
            .ContinueWith(t => new NodeProbed(address, uid, t.Result), TaskContinuationOptions.ExecuteSynchronously).PipeTo(Self);
        return true;
    }

    private static readonly TimeSpan ProbeTimeout = TimeSpan.FromSeconds(1);

    /// <summary>Probes every registered node; returns how many probes were started.</summary>
    private int ProbeAllNodes() => _agents.ToList().Count(a => ProbeNode(Address.Parse(a.Address)));

    private void OnNodeProbed(NodeProbed m)
    {
        // Only the incarnation that was there when the probe started: one restarted on the same
        // address since is another node.
        if (m.Dead) OnMemberLost(m.Address, m.Uid, "is gone (its connection closed and a reconnect was refused)");
    }

    private void OnMemberLost(Address address, long uid, string what)
    {
        if (_finished) return;
        var node = address.ToString();
        // Before the first plan, nobody holds anything; but a plan that loads a checkpoint (a resume, or a
        // rollback in place) is recovered like any other install.
        if (_state.Plan is null && _installing is null)
        {
            if (_agents.Any(a => a.Address == node))
            {
                RemoveNode(node, what);
                _report.Info($"node {node} {what} before the first plan; it will not be planned");
            }
            return;
        }
        var lost = _state.Workers.Where(w => w.NodeAddress == node && w.Id.SystemUid == uid).Select(w => w.Id).ToHashSet();
        if (lost.Count == 0) return;
        // Downed, so the cluster converges without it (new nodes can join) and this incarnation can never
        // come back: a node restarted on the same address is a new one.
        if (what != "left the cluster") Akka.Cluster.Cluster.Get(Context.System).Down(address);
        _agents.RemoveAll(a => a.Address == node && a.Uid == uid);
        // Counted before the removal takes its workers out of the state.
        int survivors = WorkersStaying - lost.Count(w => !_gone.Contains(w));
        Apply(new NodeRemoved(node, uid, what));
        bool leaving = _leaving.Remove(node);
        bool holdsState = (_state.Plan?.Workers.Any(w => lost.Contains(w.Id)) ?? false) || (_installing?.Workers.Any(w => lost.Contains(w.Id)) ?? false);
        if (!holdsState)
        {
            _report.Info($"node {node} {what}; it held no units");
            return;
        }
        _report.Info($"node {node} {what}{(leaving ? " while leaving" : "")} at step {_state.NextStep + 1} ({_phase}); recovering on {survivors} worker(s)");
        LoseWorkers(lost, "node-lost", node, a => a.Path.Address.ToString() == node);
    }

    // A worker whose stage or shard kept failing leaves the plan; its node (and its other workers) stay.
    private void OnWorkerRetired(WorkerRetired m)
    {
        var id = new WorkerId(m.Worker.NodeAddress, m.Worker.SystemUid, m.Worker.Device);
        if (_finished || !_state.Workers.Any(w => w.Id == id) || !_retiredWorkers.Add(id)) return;
        _report.Info($"worker {id} leaves the plan: {m.Reason}");
        if (_state.Plan is null || (!_state.Plan.Workers.Any(w => w.Id == id) && !(_installing?.Workers.Any(w => w.Id == id) ?? false))) return;
        var path = $"worker-{id.Device}";
        LoseWorkers([id], "worker-retired", id.ToString(), a => a.Path.Address.ToString() == id.NodeAddress && a.Path.Elements.Contains(path));
    }

    /// <summary>Workers whose state is gone (their node died, or they kept failing): recover without them, by phase.</summary>
    private void LoseWorkers(IReadOnlyCollection<WorkerId> lost, string eventKind, string who, Func<IActorRef, bool> actorsOf)
    {
        _gone.UnionWith(lost);
        _membershipEvents.Add(new MembershipChange(eventKind, who, _state.NextStep + 1, System.Diagnostics.Stopwatch.StartNew()));
        ForgetActors(actorsOf);
        // A writer of the checkpoint in flight may be gone: give it up (what waited for its copy is dropped:
        // the recovery below decides what runs next).
        _afterCopies = null;
        if (_writing is not null) AbandonCheckpoint($"{who} lost while the checkpoint of step {_writing.Step} was being written");
        switch (_phase)
        {
            case Phase.Computing or Phase.Norms:
                // Nothing was applied: abort the attempt everywhere and redo the step under a plan without the node.
                foreach (var w in _allWorkers) w.Tell(new AbortAttempt(_fence, $"{who} lost"));
                _redone++;
                Timers.Cancel("phase");
                Recover();
                break;
            case Phase.Updating:
                // Some units may have applied the step: finish it on the survivors (mirrors included, they hold
                // the lost node's gradients), commit it, then re-plan (StartStepOrFinish sees _gone).
                RollForward($"{who} lost");
                break;
            case Phase.Evaluating:
                foreach (var w in _allWorkers) w.Tell(new AbortAttempt(_evalFence, $"{who} lost"));
                Timers.Cancel("phase");
                _afterInstall = AfterInstall.Evaluate;
                Recover();
                break;
            case Phase.Finishing:
                Timers.Cancel("phase");
                _afterInstall = AfterInstall.Finish;
                Recover();
                break;
            case Phase.Retrying:
                // The failed attempt was aborted already and the next one has not started: recover instead.
                Timers.Cancel("phase");
                Timers.Cancel("retry");
                Recover();
                break;
            case Phase.Installing or Phase.WaitingForWorkers or Phase.Rebalancing:
                AbandonRebalanceDecision();
                _waitingFor = null;
                _waitingForNodes = null;
                Timers.Cancel("wait");
                Timers.Cancel("phase");
                Recover();
                break;
        }
    }

    // The lost workers' actors take no further part in the step in flight (their replies will never come).
    private void ForgetActors(Func<IActorRef, bool> gone)
    {
        foreach (var rank in _stages.Where(kv => gone(kv.Value)).Select(kv => kv.Key).ToList())
        {
            _stages.Remove(rank);
            _workerRefs.Remove(rank);
            _computed.Remove(rank);
            _evals.Remove(rank);
        }
        _sharedShards.RemoveAll(s => gone(s.Shard));
        _mirrors.RemoveAll(m => gone(m.Keeper));
        _allWorkers.RemoveAll(a => gone(a));
        foreach (var a in _applied.Keys.Where(gone).ToList()) _applied.Remove(a);
        foreach (var a in _summarized.Where(gone).ToList()) _summarized.Remove(a);
    }

    /// <summary>
    /// After a loss: a plan for the workers that remain, its units taken from surviving copies and mirrors
    /// (the run stops, naming them, when some unit has none left), then the interrupted work again.
    /// </summary>
    private void Recover()
    {
        int workers = WorkersStaying;
        if (NodesStaying < _config.Cluster.MinNodes)
        {
            // Fewer nodes than the run may go on with: pause (units stay in survivors' memory and mirrors)
            // until nodes join, and fail with that reason after cluster.max-wait.
            _waitingForNodes = _config.Cluster.MinNodes;
            _report.Info($"paused before step {_state.NextStep + 1}: {NodesStaying} node(s) present, cluster.min-nodes = {_config.Cluster.MinNodes}; " +
                         $"waiting up to {_config.Cluster.MaxWaitSeconds:F0} s for nodes to join");
            Enter(Phase.WaitingForWorkers, WaitingForWorkers);
            Timers.StartSingleTimer("wait", new PhaseTimeout(new Fence(_state.Epoch, _state.NextStep, -3), "nodes"), TimeSpan.FromSeconds(_config.Cluster.MaxWaitSeconds));
            return;
        }
        if (workers == 0)
        {
            Fail($"every node holding the run's state is gone ({string.Join(", ", _gone)}); resuming needs a checkpoint", FailureKind.StateLost);
            return;
        }
        // A plan being installed that loads a checkpoint has no plan before it in the state.
        Replan(workers, PipelineDegreeFor(workers, (_state.Plan ?? _installing)?.Pp ?? _rollback?.Pp ?? _config.Cluster.PipelineStages));
    }

    private void OnRegisterNode(RegisterNode m)
    {
        // The whole run must agree (model, training options, data, seed): a node with another batch size
        // or corpus would compute different gradients without any error. The reason names each setting
        // as "key: node's vs coordinator's".
        string? reason = m.Seed != _config.Seed ? $"seed differs: node has {m.Seed}, coordinator has {_config.Seed}"
            : m.RunFingerprint != _runFingerprint
                ? "run config differs: " + string.Join("; ", TrainingState.RunFingerprintDifferences(m.RunFingerprint, _runFingerprint))
                : null;
        if (reason is not null)
        {
            _log.Warning("refusing node {0}: {1}", m.NodeAddress, reason);
            Sender.Tell(new NodeRefused(m.NodeAddress, reason));
            return;
        }
        if (_agents.Any(n => n.Address == m.NodeAddress && n.Uid == m.SystemUid))
        {
            Sender.Tell(new NodeAccepted(m.NodeAddress));   // a retry of a registration we already have
            return;
        }
        _agents.Add((m.NodeAddress, m.SystemUid, Sender));
        _processOf[m.NodeAddress] = m.ProcessId;
        NoteDomain(m);
        NoteHeld(m);
        Apply(new NodeJoined(m.NodeAddress, m.SystemUid,
            m.DataEndpoints.Select((e, d) => new WorkerSlot(new WorkerId(m.NodeAddress, m.SystemUid, d), e)).ToList()));
        Sender.Tell(new NodeAccepted(m.NodeAddress));
        if (_state.Plan is null)
        {
            _report.Info($"node {m.NodeAddress} joined with {m.DataEndpoints.Length} device(s) ({_agents.Count}/{_config.Cluster.NodesToWaitFor})");
            if (_agents.Count != _config.Cluster.NodesToWaitFor) return;
            if (_priorPlan is not null) DecideReattach();
            else Replan(_state.Workers.Count, _config.Cluster.PipelineStages);
            return;
        }
        // A node joining a running job takes part from a step boundary: the one where a paused layout
        // finds its workers, or the first after the settle window (so nodes arriving together are
        // planned together, one pause for all).
        _report.Info($"node {m.NodeAddress} joined the running job with {m.DataEndpoints.Length} device(s); {_state.Workers.Count} worker(s) present");
        _joinedAt[m.NodeAddress] = System.Diagnostics.Stopwatch.StartNew();
        if (_waitingForNodes is { } needed)
        {
            if (NodesStaying >= needed)
            {
                _waitingForNodes = null;
                Timers.Cancel("wait");
                Recover();
            }
            return;
        }
        if (_waitingFor is { } wanted)
        {
            if (WorkersStaying >= wanted.Workers)
            {
                _waitingFor = null;
                Timers.Cancel("wait");
                Replan(wanted.Workers, wanted.Pp);
            }
            return;
        }
        double now = _uptime.Elapsed.TotalSeconds;
        // Below its redundancy the run is at risk until a plan uses the newcomer: no settle window then.
        bool atRisk = Redundancy() is { Met: false };
        if (atRisk) _report.Info($"the run is below its redundancy: node {m.NodeAddress} is planned in at the next step boundary");
        _joinSettle.Joined(now, atRisk ? now : double.PositiveInfinity);
    }

    /// <summary>Whether the installed plan keeps every unit on cluster.redundancy + 1 nodes (null before the first plan).
    /// Once per plan: status and diagnose ask on every poll, and the answer changes only with the plan.</summary>
    private Coordination.RedundancyCheck.Result? Redundancy()
    {
        if (_state.Plan is not { } plan) return null;
        if (!ReferenceEquals(_redundancy?.Plan, plan)) _redundancy = (plan, Coordination.RedundancyCheck.Of(plan, _config.Model, _config.Cluster.Redundancy));
        return _redundancy.Value.Result;
    }

    private (TrainingPlan Plan, Coordination.RedundancyCheck.Result Result)? _redundancy;

    // ---- graceful leave -------------------------------------------------------------------------

    // Nodes that asked to leave and still hold units: planned out at the next step boundary.
    private readonly Dictionary<string, IActorRef> _leaving = new();
    private readonly Dictionary<string, System.Diagnostics.Stopwatch> _leaveAsked = new();
    // Nodes that joined the running job, until a plan includes them (for their membership event).
    private readonly Dictionary<string, System.Diagnostics.Stopwatch> _joinedAt = new();

    // Workers the next plan may use: not leaving, not retired after failing too often.
    private IEnumerable<WorkerSlot> StayingWorkers => _state.Workers.Where(w => !_leaving.ContainsKey(w.NodeAddress) && !_retiredWorkers.Contains(w.Id));

    private int WorkersStaying => StayingWorkers.Count();

    // Workers that left the plan after failing too often (their nodes stay): never planned again.
    private readonly HashSet<WorkerId> _retiredWorkers = new();

    private void OnRequestLeave(RequestLeave m)
    {
        if (_finished) { Sender.Tell(new LeaveGranted(m.NodeAddress, _state.NextStep)); return; }
        bool holdsUnits = (_state.Plan?.Workers.Any(w => w.NodeAddress == m.NodeAddress) ?? false)
                          || (_installing?.Workers.Any(w => w.NodeAddress == m.NodeAddress) ?? false);
        if (!holdsUnits)
        {
            // Nothing of the run is on it (not planned yet, or idle): it may go at once.
            RemoveNode(m.NodeAddress, "left (it held no units)");
            Sender.Tell(new LeaveGranted(m.NodeAddress, _state.NextStep));
            return;
        }
        _leaving[m.NodeAddress] = Sender;
        _leaveAsked[m.NodeAddress] = System.Diagnostics.Stopwatch.StartNew();
        double now = _uptime.Elapsed.TotalSeconds;
        // A third of the notice for gathering: the step in flight, the re-plan and the hand-over need the rest.
        _leaveSettle.Joined(now, m.NoticeSeconds > 0 ? now + m.NoticeSeconds / 3 : double.PositiveInfinity);
        if (WorkersStaying == 0)
        {
            // The last node is going: the run ends after the step in flight, like a stop.
            _stopRequested ??= $"node {m.NodeAddress}, the last, is leaving";
            _report.Info($"node {m.NodeAddress} asked to leave and no other worker remains; stopping after the step in flight");
            if (_waitingFor is not null) { _waitingFor = null; Timers.Cancel("wait"); Finish(); }
            return;
        }
        _report.Info($"node {m.NodeAddress} asked to leave; its units move to the {WorkersStaying} worker(s) that stay at the next step boundary");
        if (_waitingFor is not null)
        {
            // Paused, so no step is in flight: hand over now.
            _waitingFor = null;
            Timers.Cancel("wait");
            ReplanWithoutLeavers();
        }
        else if (_holding) ReplanWithoutLeavers();   // held at a boundary (train pause): hand over now, hold again after
    }

    private void ReplanWithoutLeavers()
    {
        int workers = WorkersStaying;
        Replan(workers, PipelineDegreeFor(workers, _state.Plan!.Pp));
    }

    // After a plan without them is installed, leaving nodes hold nothing: let them go.
    private void GrantLeaves()
    {
        foreach (var (address, agent) in _leaving.ToList())
        {
            if (_state.Plan!.Workers.Any(w => w.NodeAddress == address)) continue;
            RemoveNode(address, "handed its units over and left");
            _leaving.Remove(address);
            if (_leaveAsked.Remove(address, out var since)) _membershipEvents.Add(new MembershipChange("node-left", address, _state.NextStep + 1, since));
            agent.Tell(new LeaveGranted(address, _state.NextStep));
            _report.Info($"node {address} handed its units over; it leaves before step {_state.NextStep + 1}");
        }
    }

    // Every incarnation of the node the run knows (its workers' system uids) stops being plannable.
    private void RemoveNode(string address, string why)
    {
        _agents.RemoveAll(a => a.Address == address);
        foreach (var w in _state.Workers.Where(w => w.NodeAddress == address).Select(w => w.Id.SystemUid).Distinct().ToList())
            Apply(new NodeRemoved(address, w, why));
    }

    // A join waiting for its settle window; a layout waiting for workers (paused).
    private readonly Coordination.JoinSettle _joinSettle;
    // Nodes asking to leave, gathered the same way: nodes reclaimed together leave in one re-plan.
    private readonly Coordination.JoinSettle _leaveSettle;
    private readonly System.Diagnostics.Stopwatch _uptime = System.Diagnostics.Stopwatch.StartNew();
    private (int Workers, int Pp)? _waitingFor;
    // After a loss left fewer nodes than cluster.min-nodes: paused until that many are present.
    private int? _waitingForNodes;

    private int NodesStaying => StayingWorkers.Select(w => w.NodeAddress).Distinct().Count();

    /// <summary>The pipeline degree to keep when the worker count changes: the current one if it still divides it, else the largest that does.</summary>
    private static int PipelineDegreeFor(int workers, int current)
    {
        for (int pp = Math.Min(current, workers); pp > 1; pp--)
            if (workers % pp == 0) return pp;
        return 1;
    }

    // ---- waiting for nodes ---------------------------------------------------------------------

    private void WaitingForNodes()
    {
        Common();
    }

    // ---- planning and installing ---------------------------------------------------------------

    private TrainingPlan? _installing;
    // The workers the plan was sent to: a node that joins during an install is planned at the next boundary.
    private HashSet<WorkerId> _installTargets = new();
    private readonly Dictionary<WorkerId, PlanInstalled> _installed = new();
    private System.Diagnostics.Stopwatch _installClock = new();
    private IReadOnlyList<UnitId> _unitsMoving = [];
    // Restarted at every commit: the re-plan pause is read off it at the first commit under a new plan.
    private readonly System.Diagnostics.Stopwatch _sinceCommit = new();
    private bool _firstStepOfPlan;

    /// <param name="placement">Where the experts go (a rebalance); null: where the planner keeps them.</param>
    private void Replan(int workers, int pp, ExpertPlacement? placement = null)
    {
        // Held at a boundary (train pause): the re-plan runs now, and the boundary reached once it is installed holds again.
        _holding = false;
        // An install moves and releases units: not before the boundary's checkpoint copies are taken.
        if (AfterCopies(() => Replan(workers, pp, placement))) return;
        var previous = _state.Plan;
        TrainingPlan next;
        TransferPlan transfers;
        _joinSettle.Planned();   // whoever is present now is planned now
        _leaveSettle.Planned();   // and whoever asked to leave by now is planned out
        if (workers > WorkersStaying && previous is not null)
        {
            // Too few workers for the layout asked for: pause (the units stay where they are) until nodes
            // join, and fail with that reason after cluster.max-wait.
            _waitingFor = (workers, pp);
            _report.Info($"paused before step {_state.NextStep + 1}: layout {workers}x{pp} needs {workers} worker(s), {WorkersStaying} present; " +
                         $"waiting up to {_config.Cluster.MaxWaitSeconds:F0} s for nodes to join");
            Enter(Phase.WaitingForWorkers, WaitingForWorkers);
            Timers.StartSingleTimer("wait", new PhaseTimeout(new Fence(_state.Epoch, _state.NextStep, -3), "workers"), TimeSpan.FromSeconds(_config.Cluster.MaxWaitSeconds));
            return;
        }
        try
        {
            var available = StayingWorkers.ToList();
            if (workers > available.Count) throw new ArgumentException($"{workers} workers asked for, {available.Count} available");
            int epoch = Math.Max(_state.Epoch, _lastEpoch) + 1;
            next = ElasticPlanner.Next(previous, available, workers, pp, _config.Model, epoch, _config.Cluster.Redundancy, _domainOf);
            if (placement is not null) next = next.WithPlacement(placement);
            else if (previous?.Copies is not null && previous.Pp == 1 && next.Pp == 1)
                // A join or a loss after a rebalance: keep the surviving extra copies of hot experts (PP 1, as rebalancing).
                next = next.WithPlacement(ExpertPlacement.Of(next).KeepingCopiesOf(ExpertPlacement.Of(previous),
                    _config.Rebalance.SlotsPerWorker(_config.Model.MoE.RoutedExperts, next.WorldSize)));
            transfers = previous is null ? new TransferPlan([], new Dictionary<WorkerId, UnitId[]>()) : TransferPlanner.Between(previous, next, _config.Model, _gone);
            _lastEpoch = epoch;
        }
        catch (UnitsLostException ex)
        {
            // Every copy of these units is gone (no mirror, or every mirror died too): back to the newest
            // checkpoint in place when the run directory has one, else the run stops here, saying why.
            if (!TryRollBack(ex, pp))
                Fail($"cannot continue after losing {string.Join(", ", _gone)}: {ex.Message}. No copy is left in memory " +
                     $"(cluster.redundancy = {_config.Cluster.Redundancy}, and every copy of these units was lost together); {WhyNoRollback()}", FailureKind.StateLost);
            return;
        }
        catch (ArgumentException ex)
        {
            Fail($"cannot lay out the run on {workers} worker(s) with PP {pp}: {ex.Message}");
            return;
        }
        _installTarget = (workers, pp);
        _installing = next;
        _installed.Clear();
        _installTargets = _state.Workers.Select(w => w.Id).ToHashSet();
        _unitsMoving = transfers.Moves.Select(m => m.Unit).ToList();
        var prevWorkers = previous?.Workers.ToList() ?? [];
        var msg = new InstallPlan(next.Epoch, next.Dp, next.Pp,
            next.Stages.Select(s => s.First).ToArray(), next.Stages.Select(s => s.End).ToArray(),
            next.Workers.Select(Info).ToArray(), next.ExpertOwner, _state.NextStep,
            prevWorkers.Select(Info).ToArray(),
            transfers.Moves.Select(t => new UnitMove(t.Unit.ToString(), prevWorkers.FindIndex(w => w.Id == t.From), next.RankOf(t.To))).ToArray())
        {
            Redundancy = next.Redundancy,
            Resume = previous is null ? _resume : null,
            ExpertCopies = next.Copies,
            MirrorKeepers = next.Keepers,
            Domains = next.Domains?.ToArray(),
        };
        _report.Info($"plan {next.Epoch} from step {_state.NextStep}: {next.WorldSize} worker(s), DP {next.Dp} x PP {next.Pp}, stages " +
                     string.Join(" ", next.Stages.Select(s => $"[{s.First},{s.End})")) +
                     $", experts on {next.ExpertOwner.SelectMany(o => o).Distinct().Count()} worker(s)" +
                     (next.Copies is { } copies ? $" with {copies.Sum(l => l.Sum(c => c.Length - 1))} extra cop(ies) of hot experts" : "") +
                     $", {transfers.Moves.Count} unit(s) to move" +
                     MirrorSummary(next));
        _installClock = System.Diagnostics.Stopwatch.StartNew();
        foreach (var a in _agents) a.Agent.Tell(msg);
        Enter(Phase.Installing, Installing);
        Timers.StartSingleTimer("phase", new PhaseTimeout(new Fence(next.Epoch, _state.NextStep, -1), "plan install"),
            TimeSpan.FromSeconds(_config.Cluster.PlanTimeoutSeconds));
    }

    private void WaitingForWorkers()
    {
        Receive<RetryPlan>(_ =>
        {
            var (workers, pp) = _installTarget;
            workers = Math.Min(workers, WorkersStaying);
            Replan(workers, PipelineDegreeFor(workers, pp));
        });
        Common();
    }

    private sealed record RetryPlan;
    private const int MaxInstallRetries = 3;
    private int _installFailures;
    private (int Workers, int Pp) _installTarget;

    private static WorkerInfo Info(WorkerSlot w) => new(w.NodeAddress, w.Device, w.DataEndpoint, w.Id.SystemUid);

    private void Installing()
    {
        Receive<PlanInstalled>(OnPlanInstalled);
        Receive<PlanFailed>(m =>
        {
            if (_installing is null || m.Epoch != _installing.Epoch) return;
            var why = $"worker {m.Worker.NodeAddress}/d{m.Worker.Device} could not install plan {m.Epoch}: {m.Reason}";
            // Often a peer of the transfer died and its loss is not known yet: probe, wait a moment, and
            // plan again (with whoever is still there then). A failure that repeats stops the run.
            if (++_installFailures > MaxInstallRetries) { Fail(why, FailureKind.StateLost); return; }
            _report.Info($"{why}; planning again in 1 s ({_installFailures}/{MaxInstallRetries})");
            ProbeAllNodes();
            _installing = null;
            Timers.Cancel("phase");
            Timers.StartSingleTimer("replan", new RetryPlan(), TimeSpan.FromSeconds(1));
            Enter(Phase.WaitingForWorkers, WaitingForWorkers);
        });
        Common();
    }

    private void OnPlanInstalled(PlanInstalled m)
    {
        if (_installing is null || m.Epoch != _installing.Epoch) return;
        var id = new WorkerId(m.Worker.NodeAddress, m.Worker.SystemUid, m.Worker.Device);
        if (!_installTargets.Contains(id)) return;
        _installed[id] = m;
        if (_installed.Count < _installTargets.Count) return;
        var plan = _installing;
        _installing = null;
        Timers.Cancel("phase");
        _stages.Clear();
        _workerRefs.Clear();
        _sharedShards.Clear();
        _allWorkers.Clear();
        _mirrors.Clear();
        foreach (var p in _installed.Values)
        {
            _allWorkers.Add(p.Self);
            if (p.Rank < 0) continue;
            foreach (var keeper in p.Mirrors) _mirrors.Add((p.Rank, keeper));
            _stages[p.Rank] = p.Stage;
            _workerRefs[p.Rank] = p.Self;
            for (int i = 0; i < p.Shards.Length; i++) _sharedShards.Add((p.Rank, p.ShardOrdinals[i], p.Shards[i]));
        }
        if (_stages.Count != plan.WorldSize)
        {
            Fail($"plan {plan.Epoch}: {_stages.Count} of {plan.WorldSize} ranks installed", FailureKind.StateLost);
            return;
        }
        _sharedShards.Sort((a, b) => (a.Rank, a.Ordinal).CompareTo((b.Rank, b.Ordinal)));
        long bytes = _installed.Values.Sum(p => p.BytesReceived);
        double seconds = _installClock.Elapsed.TotalSeconds;
        Observability.RunMetrics.PlanInstalled(plan.Epoch, seconds);
        _plans.Add(new PlanRecord(plan.Epoch, _state.NextStep, plan.Dp, plan.Pp, _unitsMoving, bytes, seconds,
            Enumerable.Range(0, plan.WorldSize).Select(r => (plan.Workers[r].Id, _workerRefs[r], _stages[r])).ToList()) { Plan = plan });
        Apply(new PlanChanged(plan, _state.NextStep));
        _resume = null;   // the units are in the workers now
        _gone.Clear();
        _installFailures = 0;
        foreach (var w in plan.Workers)
            if (_joinedAt.Remove(w.NodeAddress, out var since))
                _membershipEvents.Add(new MembershipChange("node-joined", w.NodeAddress, _state.NextStep + 1, since));
        // Before the install times are noted: a leave granted here is one of the changes this plan took into account.
        if (_leaving.Count > 0) GrantLeaves();
        foreach (var e in _membershipEvents.Where(e => e.Installed is null))
            e.Installed = (e.Since.Elapsed.TotalSeconds - seconds, seconds, e.Since.Elapsed.TotalSeconds);
        if (_plans.Count > 1)
            _report.Info($"plan {plan.Epoch} installed in {seconds * 1000:F0} ms: {_unitsMoving.Count} unit(s), {bytes / 1024.0:F0} KiB moved");
        _firstStepOfPlan = _plans.Count > 1;
        if (!_clock.IsRunning) _clock.Start();
        var after = _afterInstall;
        _afterInstall = AfterInstall.Step;
        switch (after)
        {
            case AfterInstall.Evaluate: StartEval(_evalResult!); break;
            case AfterInstall.Finish: Finish(); break;
            default: StartStepOrFinish(); break;
        }
    }

    // ---- steps ---------------------------------------------------------------------------------

    private void StartStepOrFinish()
    {
        if (_gone.Count > 0)
        {
            Recover();
            return;
        }
        long step = _state.NextStep;
        bool timeUp = _config.Train.TimeLimitSeconds > 0 && _clock.Elapsed.TotalSeconds >= _config.Train.TimeLimitSeconds;
        if (step >= _config.Train.Steps || timeUp || _stopRequested is not null)
        {
            Finish();
            return;
        }
        if (ShellControlsDue()) return;
        // Leavers stay in the steps until their quiet window (or a third of the shortest notice) has passed.
        if (_leaving.Count > 0 && _leaveSettle.Due(_uptime.Elapsed.TotalSeconds))
        {
            ReplanWithoutLeavers();
            return;
        }
        if (_requested is { } r)
        {
            _requested = null;
            Replan(r.Workers, r.Pp);
            return;
        }
        if (RebalanceIfDue(step)) return;
        if (_schedule.TryPeek(out var point) && point.Step <= step)
        {
            _schedule.Dequeue();
            Replan(point.Workers, point.Pp);
            return;
        }
        if (_joinSettle.Due(_uptime.Elapsed.TotalSeconds))
        {
            int workers = WorkersStaying;
            Replan(workers, PipelineDegreeFor(workers, _state.Plan!.Pp));
            return;
        }
        if (HoldAtBoundary()) return;
        _stepClock = System.Diagnostics.Stopwatch.StartNew();
        StartAttempt(new Fence(_state.Epoch, step, 0));
    }

    private void StartAttempt(Fence fence)
    {
        _fence = fence;
        _computeAttempt = fence.Attempt;
        _computed.Clear();
        _norms.Clear();
        _applied.Clear();
        Enter(Phase.Computing, Computing);
        _suspects.Tell(new SuspectProber.StepStarted(_agents.Select(a => (a.Agent.Path.Address, a.Uid)).ToList()));
        StartPhaseTimer("compute", _config.Cluster.StepTimeoutSeconds);
        var run = new RunStep(fence);
        foreach (var m in _mirrors) m.Keeper.Tell(run);
        foreach (var s in _stages.Values) s.Tell(run);
        if (_faults?.MatchesCoordinator(FaultPhase.Forward, fence) == true) KillThisProcess("forward");
    }

    // cluster.fault-injection with worker=coordinator (coordinator fail-over tests): SIGKILL, as `kill -9`.
    private readonly FaultInjection? _faults;

    private void KillThisProcess(string phase)
    {
        FaultInjection.KillThisProcess($"fault injection: killing the coordinator's process in {phase} of step {_fence.Step} attempt {_fence.Attempt}");
    }

    private void StartPhaseTimer(string phase, double seconds)
        => Timers.StartSingleTimer("phase", new PhaseTimeout(_fence, phase), TimeSpan.FromSeconds(seconds));

    private void Computing()
    {
        Receive<StepComputed>(OnStepComputed);
        Receive<WorkerFailed>(OnWorkerFailed);
        Receive<RequestAbort>(m => Redo($"abort requested: {m.Reason}"));
        Common();
    }

    private void OnStepComputed(StepComputed m)
    {
        if (m.Fence != _fence) return;
        _computed[m.Worker] = m;
        NoteWorkerStats(m);
        if (_computed.Count < _stages.Count) return;
        _tCompute = _stepClock.Elapsed.TotalMilliseconds;
        if (_sharedShards.Count == 0) { _tNorm = _tCompute; ApplyUpdate(); return; }
        Enter(Phase.Norms, Norms);
        foreach (var s in _sharedShards) s.Shard.Tell(new QueryExpertNorm(_fence));
    }

    private void Norms()
    {
        Receive<ExpertNorm>(m =>
        {
            if (m.Fence != _fence) return;
            _norms[(m.Worker, m.MoEOrdinal)] = m;
            if (_norms.Count == _sharedShards.Count) { _tNorm = _stepClock.Elapsed.TotalMilliseconds; ApplyUpdate(); }
        });
        Receive<WorkerFailed>(OnWorkerFailed);
        Receive<RequestAbort>(m => Redo($"abort requested: {m.Reason}"));
        Common();
    }

    private void ApplyUpdate()
    {
        // The boundary's checkpoint copies must be taken before any unit changes.
        var fence = _fence;
        if (AfterCopies(() => { if (_fence == fence && _phase is Phase.Computing or Phase.Norms) ApplyUpdate(); })) return;
        var plan = _state.Plan!;
        var t = _config.Train;
        int totalMicro = t.MicroBatchesPerStep;
        // Every sum in the canonical order, a function of the global batch alone (micro-batch order for losses,
        // name order for the norm): the same bits whatever the layout or the order replies came in.
        var computed = _computed.OrderBy(kv => kv.Key).Select(kv => kv.Value).ToList();
        double loss = MicroBatchLosses.Sum(computed.Select(c => (c.FirstMicroBatch, c.Losses)), totalMicro) / totalMicro;
        if (!double.IsFinite(loss)) { Fail(new TrainingDivergedException(_fence.Step, "the loss", loss)); return; }
        // Replicas hold identical reduced dense gradients: count each stage once (replica 0). Private
        // experts exist only with one replica, so they are counted once too.
        double sumSq = GradClip.CanonicalTotal(computed.Where(c => plan.ReplicaOf(c.Worker) == 0).SelectMany(c => c.Norms.Pairs)
                       .Concat(_norms.Values.SelectMany(n => n.Norms.Pairs)));
        if (!double.IsFinite(sumSq)) { Fail(new TrainingDivergedException(_fence.Step, "the gradient norm", Math.Sqrt(sumSq))); return; }
        int moeLayers = plan.ExpertOwner.Length;
        var loads = Enumerable.Range(0, moeLayers).Select(_ => new long[_config.Model.MoE.RoutedExperts]).ToArray();
        foreach (var c in computed)
            for (int i = 0; i < c.MoELayers.Length; i++)
                for (int e = 0; e < loads[c.MoELayers[i]].Length; e++)
                    loads[c.MoELayers[i]][e] += c.ExpertCounts[i][e];
        long step = _fence.Step;
        double lr = LrSchedule.At(step, t.Steps, t.Lr, t.MinLr, t.WarmupSteps);
        bool checksum = _config.Cluster.ChecksumEvery > 0 && plan.Dp > 1 && (step + 1) % _config.Cluster.ChecksumEvery == 0;
        _pendingResult = new StepResult(step, loss, lr, Math.Sqrt(sumSq), LoadBalance.MeanMaxVio(loads), loads,
            (long)t.GlobalBatch * _config.Model.Context, 0);
        _pendingUpdate = new ApplyUpdate(_fence, lr, GradClip.Coefficient(sumSq, t.GradClip), loads, checksum, _computeAttempt);
        SendUpdate();
    }

    private void SendUpdate()
    {
        var update = _pendingUpdate! with { Fence = _fence };
        _applied.Clear();
        Enter(Phase.Updating, Updating);
        StartPhaseTimer("update", _config.Cluster.StepTimeoutSeconds);
        if (_faults?.MatchesCoordinator(FaultPhase.Update, _fence) == true)
        {
            // Only rank 0's stage gets the update; its reply kills this process (OnUpdateApplied).
            _stages[0].Tell(update);
            return;
        }
        foreach (var s in _stages.Values) s.Tell(update);
        foreach (var s in _sharedShards) s.Shard.Tell(update);
        foreach (var m in _mirrors) m.Keeper.Tell(update);
    }

    private void Updating()
    {
        Receive<UpdateApplied>(OnUpdateApplied);
        // The update is all-or-nothing per unit: after a failure here, some units applied the step and
        // the rest did not. Redoing the step would apply it twice to the first kind, so roll forward:
        // send the same update again as the next attempt; units that applied it skip it.
        Receive<WorkerFailed>(m =>
        {
            if (m.Fence != _fence) return;
            if (m.Kind is FailureKind.Diverged or FailureKind.StateLost) { Fail(Describe(m), m.Kind); return; }
            RollForward(Describe(m));
        });
        Receive<RequestAbort>(m => RollForward($"abort requested: {m.Reason}"));
        Common();
    }

    private void RollForward(string why)
    {
        if (!NextAttempt(why, out var next)) return;
        _report.Info($"step {_fence.Step + 1}: update interrupted ({why}); rolling forward as attempt {next.Attempt}");
        _fence = next;
        SendUpdate();
    }

    private string Describe(WorkerFailed m) => $"worker {m.Worker} failed at step {m.Fence.Step + 1} attempt {m.Fence.Attempt} ({m.Kind}): {m.Reason}";

    private void OnUpdateApplied(UpdateApplied m)
    {
        if (m.Fence != _fence) return;
        if (_faults?.MatchesCoordinator(FaultPhase.Update, _fence) == true) KillThisProcess("update");
        _applied[Sender] = m;
        if (_applied.Count < _stages.Count + _sharedShards.Count + _mirrors.Count) return;
        Timers.Cancel("phase");
        if (!ChecksumsAgree(out var why)) { Fail(why, FailureKind.StateLost); return; }
        var r = _pendingResult! with { Seconds = _stepClock.Elapsed.TotalSeconds };
        _suspects.Tell(new SuspectProber.StepEnded(r.Seconds));
        if (Trace) _log.Info("step {0}: compute {1:F1} ms, expert norms {2:F1} ms, update {3:F1} ms", _fence.Step, _tCompute, _tNorm - _tCompute, _stepClock.Elapsed.TotalMilliseconds - _tNorm);
        Apply(new StepCommitted(r, _fence.Attempt + 1));
        RecordLoads(r);
        if (_firstStepOfPlan)
        {
            _firstStepOfPlan = false;
            _plans[^1] = _plans[^1] with { GapSeconds = _sinceCommit.Elapsed.TotalSeconds };
        }
        _sinceCommit.Restart();
        ReportRollback();
        // Only changes a plan has taken into account: a loss in the update phase commits that step on the
        // survivors first, and recovers after it.
        foreach (var e in _membershipEvents.Where(e => e.Installed is not null).ToList())
        {
            _membershipEvents.Remove(e);
            double total = e.Since.Elapsed.TotalSeconds;
            var (before, install, installedAt) = e.Installed ?? (double.NaN, double.NaN, double.NaN);
            _report.MembershipEvent(e.Kind, e.Node, e.Step, total, new Dictionary<string, double>
            {
                ["detected_unix"] = e.DetectedUnix, ["replan_s"] = before, ["install_s"] = install, ["redo_s"] = total - installedAt,
            });
        }
        long done = _state.NextStep;
        bool last = done >= _config.Train.Steps
                    || (_config.Train.TimeLimitSeconds > 0 && _clock.Elapsed.TotalSeconds >= _config.Train.TimeLimitSeconds)
                    || _stopRequested is not null;
        bool eval = done % _config.Train.EvalEvery == 0 || last;
        if (_gone.Count > 0)
        {
            // A node was lost during this step's update, which the survivors finished: re-plan before anything
            // else runs (the evaluation of this step included), then carry on.
            _evalResult = r;
            _afterInstall = eval ? AfterInstall.Evaluate : AfterInstall.Step;
            if (!eval) _report.Step(r, null, _config.Train.Steps);
            Recover();
            return;
        }
        Action next = eval ? () => StartEval(r) : () =>
        {
            _report.Step(r, null, _config.Train.Steps);
            StartStepOrFinish();
        };
        if (CheckpointDue(done, last)) BeginCheckpoint(done, next);
        else next();
    }

    private bool ChecksumsAgree(out string why)
    {
        why = "";
        var plan = _state.Plan!;
        // Only stages answer with a checksum (shards send 0), and only on checksum steps.
        foreach (var stage in Enumerable.Range(0, plan.Pp))
        {
            var values = _applied.Values.Where(a => a.DenseChecksum != 0 && plan.StageOf(a.Worker) == stage).Select(a => a.DenseChecksum).Distinct().ToList();
            if (values.Count > 1)
            {
                why = $"dense parameters of stage {stage} differ between data-parallel replicas after step {_fence.Step}: checksums {string.Join(", ", values.Select(v => v.ToString("X16")))}";
                return false;
            }
        }
        return true;
    }

    // ---- abort and redo ------------------------------------------------------------------------

    private void OnWorkerFailed(WorkerFailed m)
    {
        if (m.Fence != _fence) return;
        if (m.Kind is FailureKind.Diverged or FailureKind.StateLost) { Fail(Describe(m), m.Kind); return; }
        Redo(Describe(m));
    }

    /// <summary>Aborts the attempt in flight everywhere and runs the step again as the next attempt, from unchanged state.</summary>
    private void Redo(string why)
    {
        if (!NextAttempt(why, out var next)) return;
        _report.Info($"step {_fence.Step + 1}: attempt {_fence.Attempt} aborted ({why}); redoing as attempt {next.Attempt}");
        // A failure may be a peer that died and is not known lost yet (its sends fail at once: the data plane
        // sees a SIGKILL before anything else): ask every node, and start the next attempt only once they all
        // answered (a refused connection answers in a millisecond, a hung host within the probe's timeout).
        // Otherwise the probe's verdict would come while the attempt runs and abort it too, and whether a kill
        // costs one attempt or two would be decided by timing. From the second redo on it also backs off (0.1 s,
        // doubling: 12.7 s over all attempts, more than the failure detector needs).
        _fence = next;
        Timers.Cancel("phase");
        Enter(Phase.Retrying, Retrying);
        _retryProbes = ProbeAllNodes();
        // A probe always answers within its timeout; this only makes sure a lost answer cannot hold the step.
        if (_retryProbes > 0) Timers.StartSingleTimer("retry", new RetryProbesDone(next), ProbeTimeout + TimeSpan.FromSeconds(1));
        _retryBackedOff = next.Attempt <= 1;
        if (!_retryBackedOff) Timers.StartSingleTimer("phase", new StartAttemptLater(next), TimeSpan.FromMilliseconds(100 << (next.Attempt - 2)));
        StartRetryWhenReady();
    }

    private sealed record StartAttemptLater(Fence Fence);
    private sealed record RetryProbesDone(Fence Fence);

    // Phase.Retrying: probes not answered yet, and whether the back-off has passed.
    private int _retryProbes;
    private bool _retryBackedOff;

    private void Retrying()
    {
        Receive<StartAttemptLater>(m =>
        {
            if (m.Fence != _fence) return;
            _retryBackedOff = true;
            StartRetryWhenReady();
        });
        Receive<RetryProbesDone>(m =>
        {
            if (m.Fence != _fence) return;
            _retryProbes = 0;
            StartRetryWhenReady();
        });
        Receive<NodeProbed>(m =>
        {
            if (_retryProbes > 0) _retryProbes--;
            OnNodeProbed(m);   // a dead node: LoseWorkers recovers instead (the phase changes)
            StartRetryWhenReady();
        });
        Common();
    }

    private void StartRetryWhenReady()
    {
        if (_phase != Phase.Retrying || !_retryBackedOff || _retryProbes > 0) return;
        Timers.Cancel("retry");
        StartAttempt(_fence);
    }

    private bool NextAttempt(string why, out Fence next)
    {
        next = _fence with { Attempt = _fence.Attempt + 1 };
        var abort = new AbortAttempt(_fence, why);
        foreach (var w in _allWorkers) w.Tell(abort);
        if (next.Attempt >= MaxAttemptsPerStep)
        {
            Fail($"step {_fence.Step + 1} failed {MaxAttemptsPerStep} attempts; last: {why}");
            return false;
        }
        _redone++;
        return true;
    }

    private void OnPhaseTimeout(PhaseTimeout t)
    {
        if (_finished) return;
        switch (t.Phase)
        {
            case "plan install" when _installing is not null && t.Fence.Epoch == _installing.Epoch:
                Fail($"plan {t.Fence.Epoch} was not installed within {_config.Cluster.PlanTimeoutSeconds:F0} s ({_installed.Count} of {_installTargets.Count} workers answered)", FailureKind.Timeout);
                break;
            case "compute" or "update" when t.Fence == _fence:
                Self.Tell(new WorkerFailed(_fence, -1, FailureKind.Timeout, $"{t.Phase} phase did not complete within {_config.Cluster.StepTimeoutSeconds:F0} s"));
                break;
            case "evaluation" when t.Fence == _evalFence:
                Fail($"evaluation after step {t.Fence.Step} did not complete within {_config.Cluster.EvalTimeoutSeconds:F0} s", FailureKind.Timeout);
                break;
            case "nodes" when _waitingForNodes is { } needed:
                Fail($"waited {_config.Cluster.MaxWaitSeconds:F0} s for {needed} node(s) (cluster.min-nodes) after a loss; {NodesStaying} present", FailureKind.Timeout);
                break;
            case "workers" when _waitingFor is { } wanted:
                Fail($"waited {_config.Cluster.MaxWaitSeconds:F0} s for {wanted.Workers} worker(s) (layout {wanted.Workers}x{wanted.Pp}); {WorkersStaying} present", FailureKind.Timeout);
                break;
            case "checkpoint copy" when _writing is { } w && w.Step == t.Fence.Step:
                AbandonCheckpoint($"not every writer copied its units within {_config.Cluster.StepTimeoutSeconds:F0} s");
                break;
            case "finish" when t.Fence.Step == -2:
                Fail($"final parameter summaries: {_summarized.Count} of {_expectedSummaries} arrived within {_config.Cluster.FinishTimeoutSeconds:F0} s", FailureKind.Timeout);
                break;
        }
    }

    // ---- evaluation ----------------------------------------------------------------------------

    private Fence _evalFence;
    private StepResult? _evalResult;

    private void StartEval(StepResult r)
    {
        if (_gone.Count > 0)
        {
            // A node was lost at the boundary (during a checkpoint's copy): recover, then evaluate.
            _evalResult = r;
            _afterInstall = AfterInstall.Evaluate;
            Recover();
            return;
        }
        _evalResult = r;
        _evals.Clear();
        // Evaluation after step s runs under the fence of step s+1, attempt 0: past everything of step s.
        _evalFence = new Fence(_state.Epoch, _state.NextStep, 0);
        Enter(Phase.Evaluating, Evaluating);
        Timers.StartSingleTimer("phase", new PhaseTimeout(_evalFence, "evaluation"), TimeSpan.FromSeconds(_config.Cluster.EvalTimeoutSeconds));
        foreach (var s in _stages.Values) s.Tell(new RunEval(_evalFence));
    }

    private void Evaluating()
    {
        Receive<EvalComputed>(m =>
        {
            if (m.Fence != _evalFence) return;
            _evals[m.Worker] = m;
            if (_evals.Count < _stages.Count) return;
            Timers.Cancel("phase");
            double val = MicroBatchLosses.Sum(_evals.Values.Select(e => (e.FirstBatch, e.Losses)), _config.Train.EvalBatches) / _config.Train.EvalBatches;
            _validation.Add((_state.NextStep, val));
            _report.Step(_evalResult!, val, _config.Train.Steps);
            StartStepOrFinish();
        });
        Receive<WorkerFailed>(m =>
        {
            if (m.Fence == _evalFence) Fail($"evaluation after step {m.Fence.Step} failed on worker {m.Worker}: {m.Reason}", m.Kind);
        });
        Common();
    }

    // ---- finishing -----------------------------------------------------------------------------

    private readonly Dictionary<string, (double, double)> _finalParameters = new(StringComparer.Ordinal);
    private readonly HashSet<IActorRef> _summarized = new();
    private int _expectedSummaries;
    private double _runSeconds;

    private void Finish()
    {
        _runSeconds = _clock.Elapsed.TotalSeconds;
        _summarized.Clear();
        _expectedSummaries = _stages.Count + _sharedShards.Count;
        Enter(Phase.Finishing, Finishing);
        if (_stopRequested is not null) _report.Info($"stopping after step {_state.NextStep}: {_stopRequested}");
        Timers.StartSingleTimer("phase", new PhaseTimeout(new Fence(_state.Epoch, -2, 0), "finish"), TimeSpan.FromSeconds(_config.Cluster.FinishTimeoutSeconds));
        var ask = new ReportParameters(_state.Epoch);
        foreach (var s in _stages.Values) s.Tell(ask);
        foreach (var s in _sharedShards) s.Shard.Tell(ask);
        if (_expectedSummaries == 0) Complete();
    }

    private void Finishing()
    {
        Receive<ParameterSummary>(m =>
        {
            // Replicas agree (checked by checksum); keep the first answer for each name. Only copies of a
            // replicated expert answer for the same name twice, and they must be the same bits.
            for (int i = 0; i < m.Names.Length; i++)
                if (!_finalParameters.TryAdd(m.Names[i], (m.Sums[i], m.Norms[i])) && _finalParameters[m.Names[i]] != (m.Sums[i], m.Norms[i]))
                {
                    Fail($"the copies of replicated parameter {m.Names[i]} differ at the end of the run: sums {_finalParameters[m.Names[i]].Item1:R} and {m.Sums[i]:R}", FailureKind.StateLost);
                    return;
                }
            if (_summarized.Add(Sender) && _summarized.Count == _expectedSummaries) Complete();
        });
        Common();
    }

    private void Complete()
    {
        // The last checkpoint is still being written (or an old one deleted): the run ends once it is
        // committed (or given up).
        if (CheckpointWorkPending)
        {
            _completeWhenWritten = true;
            return;
        }
        _finished = true;
        Timers.CancelAll();
        var shutdown = _stopRequested is null
            ? new Shutdown("training finished", RunEnd.Finished)
            : new Shutdown($"the run was stopped: {_stopRequested}", RunEnd.Stopped);
        if (_journal is null)
        {
            EndRun(shutdown);
            return;
        }
        // Journaled before anyone hears of the end: a stand-by coordinator that takes the singleton over
        // as this one's node leaves must find the run ended, not resume it.
        long request = Journal(new RunEnded(_state.NextStep, shutdown.Reason));
        Enter(Phase.Done, () =>
        {
            Receive<EventsAppended>(m => { if (m.RequestId == request) EndRun(shutdown); });
            Receive<AppendRefused>(m =>
            {
                _log.Error("the end of the run was not journaled ({0}); a stand-by coordinator would resume it", m.Reason);
                EndRun(shutdown);
            });
            Receive<JournalFailed>(m => EndRun(shutdown));
            Receive<Terminated>(_ => EndRun(shutdown));
            Receive<object>(_ => { });
        });
    }

    private void EndRun(Shutdown shutdown)
    {
        foreach (var (address, agent) in _leaving) agent.Tell(new LeaveGranted(address, _state.NextStep));
        foreach (var n in _agents) n.Agent.Tell(shutdown);
        _done.TrySetResult(new RunResult(_state.Committed, _validation, _runSeconds, _finalParameters, _stopRequested) { Plans = _plans, RedoneAttempts = _redone });
        Enter(Phase.Done, Done);
    }

    private void Done() => Receive<object>(_ => { });

    // A divergence is told apart by its kind (and carries the divergence as its inner exception), not by wording.
    private void Fail(TrainingDivergedException diverged) => Fail(diverged.Message, FailureKind.Diverged, diverged);

    private void Fail(string reason, FailureKind kind = FailureKind.Error, Exception? error = null)
    {
        if (_finished) return;
        _finished = true;
        Timers.CancelAll();
        _log.Error("training stopped: {0}", reason);
        foreach (var n in _agents) n.Agent.Tell(new Shutdown(reason));
        _done.TrySetException(new TrainingFailedException(reason, kind, error));
        Enter(Phase.Done, Done);
    }
}

/// <summary>The distributed run stopped; the message says where and why, <see cref="Kind"/> what kind of failure.</summary>
public sealed class TrainingFailedException(string message, FailureKind kind = FailureKind.Error, Exception? inner = null) : Exception(message, inner)
{
    public FailureKind Kind { get; } = kind;
}
