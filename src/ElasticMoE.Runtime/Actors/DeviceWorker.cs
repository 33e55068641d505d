using Akka.Actor;
using Akka.Event;
using ElasticMoE.Configuration;
using ElasticMoE.Data;
using ElasticMoE.Planning;
using ElasticMoE.Runtime.DataPlane;
using ElasticMoE.Runtime.Engine;
using ElasticMoE.Runtime.Protocol;
using ElasticMoE.State;

namespace ElasticMoE.Runtime.Actors;

/// <summary>
/// The GPU worker: owns one device, its thread budget, the model's units it holds, and two kinds of
/// long-lived children — one pipeline stage and one expert shard per MoE layer — each on a thread of its
/// own (or, for the worker that owns the process's compute loop, the stage on the loop's thread), so a
/// stage blocked on a remote expert never blocks this node's shards.
/// </summary>
/// <remarks>
/// States: <c>Ready</c> (a plan installed, or none yet) and <c>Installing</c> (units moving for a new
/// plan; other plan messages wait in the stash). Installing a plan never restarts a child: units are
/// exported to and imported from the data plane (checksums verified), units the plan no longer gives
/// this worker are released, and the children rebuild their engines in place.
/// Supervision: a stage or shard that throws outside a step (steps report their failures themselves)
/// is stopped, not restarted — a restart would silently come back with nothing; the coordinator learns of
/// it through the failed step or plan and decides.
/// </remarks>
public sealed class DeviceWorker : ReceiveActor, IWithUnboundedStash
{
    public const string ComputeDispatcher = "elasticmoe-compute-dispatcher";

    private sealed record TransfersDone(InstallPlan Plan, TrainingPlan Next, int Rank, IActorRef Coordinator, long Bytes, int Units, Exception? Error);
    private sealed record ChildrenReady(InstallPlan Plan, int Rank, IActorRef Coordinator, long Bytes, int Units, Exception? Error, bool MirrorActive);

    private readonly ElasticMoEConfig _config;
    private readonly TextCorpus _corpus;
    private readonly DataPlaneNode _dataPlane;
    private readonly Hosting.NodeResources _resources;
    private readonly WorkerInfo _info;
    private readonly WorkerId _id;
    private readonly ILoggingAdapter _log = Context.GetLogger();
    private readonly Hosting.ComputeLoop? _loop;
    private readonly CancellationToken _stopping;
    private WorkerContext _context = null!;
    private IActorRef _stage = ActorRefs.Nobody;
    private IActorRef _mirror = ActorRefs.Nobody;
    private IActorRef _coordinator = ActorRefs.Nobody;
    private readonly List<IActorRef> _shards = new();
    // The install in flight: a newer plan cancels it (the coordinator re-planned, e.g. a node was lost mid-transfer).
    private CancellationTokenSource? _installCancel;
    private int _installingEpoch;

    public IStash Stash { get; set; } = null!;

    public DeviceWorker(ElasticMoEConfig config, TextCorpus corpus, Hosting.NodeResources resources, string nodeAddress, int device,
        Hosting.ComputeLoop? loop = null, CancellationToken stopping = default)
    {
        _resources = resources;
        var dataPlane = resources.DataPlanes[device];
        _loop = loop;
        _stopping = stopping;
        _config = config;
        _corpus = corpus;
        _dataPlane = dataPlane;
        long uid = Akka.Cluster.Cluster.Get(Context.System).SelfUniqueAddress.Uid;
        _id = new WorkerId(nodeAddress, uid, device);
        _info = new WorkerInfo(nodeAddress, device, dataPlane.Endpoint, uid);
        Ready();
    }

    public static Props Props(ElasticMoEConfig config, TextCorpus corpus, Hosting.NodeResources resources, string nodeAddress, int device,
        Hosting.ComputeLoop? loop = null, CancellationToken stopping = default)
        => Akka.Actor.Props.Create(() => new DeviceWorker(config, corpus, resources, nodeAddress, device, loop, stopping));

    /// <summary>Path of the expert shard of (worker, MoE ordinal) under a node's address.</summary>
    public static string ShardPath(string nodeAddress, int device, int ordinal) => $"{nodeAddress}/user/node/worker-{device}/shard-{ordinal}";

    // A stage, shard or mirror keeper that fails (a bug, an engine left inconsistent) is re-created in
    // place: its state is the units in this worker's context, not in it, so the new incarnation rebuilds
    // its engine over the same units (ChildRestarted → Reconfigure). Bounded: more than
    // cluster.worker-restarts failures of one child in a minute stop it, and this worker leaves the plan.
    protected override SupervisorStrategy SupervisorStrategy()
        => new OneForOneStrategy(_config.Cluster.WorkerRestarts, TimeSpan.FromMinutes(1), localOnlyDecider: ex =>
        {
            _log.Warning("worker {0}: {1}; re-creating it in place", _id, ex.Message);
            return Directive.Restart;
        });

    protected override void PreStart()
    {
        // Built on this (shared) dispatcher thread with one libtorch thread: an OpenMP team left behind
        // here would make the compute threads' own teams crawl (libgomp throttles every team once it
        // manages more threads than there are cores).
        TorchSharp.torch.set_num_threads(1);
        // The node's context for this device: new, or the units an earlier incarnation of this node held
        // (its coordinator died; the next one may adopt them).
        _context = _resources.Context(_id.Device, _config, _corpus, _id, _stopping);
        var stageDispatcher = _loop is null ? ComputeDispatcher : Hosting.ComputeLoopDispatcher.Id;
        _stage = Context.ActorOf(PipelineStageActor.Props(_context, _loop).WithDispatcher(stageDispatcher), "stage");
        for (int ordinal = 0; ordinal < _config.Model.Layers - _config.Model.DenseLayers; ordinal++)
            _shards.Add(Context.ActorOf(ExpertShardActor.Props(_context, ordinal).WithDispatcher(ComputeDispatcher), $"shard-{ordinal}"));
        _mirror = Context.ActorOf(MirrorKeeperActor.Props(_context).WithDispatcher(ComputeDispatcher), "mirror");
        foreach (var child in _shards.Append(_stage).Append(_mirror)) Context.Watch(child);
    }

    private Props ChildProps(string name)
        => name == "stage" ? PipelineStageActor.Props(_context, _loop).WithDispatcher(_loop is null ? ComputeDispatcher : Hosting.ComputeLoopDispatcher.Id)
            : name == "mirror" ? MirrorKeeperActor.Props(_context).WithDispatcher(ComputeDispatcher)
            : ExpertShardActor.Props(_context, int.Parse(name.AsSpan("shard-".Length), System.Globalization.CultureInfo.InvariantCulture)).WithDispatcher(ComputeDispatcher);

    // A child that failed more often than the supervisor allows was stopped: this worker leaves the plan
    // (the coordinator recovers its units from copies and mirrors), and a fresh, idle child takes the
    // name so the next plan can reconfigure it like any other.
    private void OnChildTerminated(Terminated t)
    {
        if (_stopping.IsCancellationRequested) return;
        var name = t.ActorRef.Path.Name;
        var fresh = Context.ActorOf(ChildProps(name), name);
        Context.Watch(fresh);
        if (name == "stage") _stage = fresh;
        else if (name == "mirror") _mirror = fresh;
        else _shards[_shards.IndexOf(t.ActorRef)] = fresh;
        var reason = $"its {name} failed more than {_config.Cluster.WorkerRestarts} time(s) within a minute";
        _log.Error("worker {0}: {1}; it leaves the plan", _id, reason);
        _coordinator.Tell(new WorkerRetired(_info, reason));
    }

    private void Ready()
    {
        Receive<InstallPlan>(BeginInstall);
        Receive<WriteCheckpoint>(OnWriteCheckpoint);
        Receive<AbortAttempt>(m => _context.Abort(m.Fence));
        Receive<Terminated>(OnChildTerminated);
    }

    private void Installing()
    {
        Receive<AbortAttempt>(m => _context.Abort(m.Fence));
        Receive<InstallPlan>(m =>
        {
            // A newer plan supersedes the one being installed: stop waiting for its transfers (a peer of
            // them may be dead), then install the newer one.
            if (m.Epoch > _installingEpoch) _installCancel?.Cancel();
            Stash.Stash();
        });
        Receive<TransfersDone>(OnTransfersDone);
        Receive<ChildrenReady>(OnChildrenReady);
        ReceiveAny(_ => Stash.Stash());
    }

    // At a step boundary (the coordinator starts nothing until every writer has answered CheckpointCopied):
    // copy to host here, on this actor's thread while no stage or shard touches the units, then write in
    // the background while training goes on.
    private void OnWriteCheckpoint(WriteCheckpoint m)
    {
        var coordinator = Sender;
        List<CheckpointIO.HostCopy> copies;
        try
        {
            copies = CheckpointIO.CopyToHost(_context, m.Units.Select(UnitId.Parse));
        }
        catch (Exception ex)
        {
            coordinator.Tell(new CheckpointCopied(m.Step, m.Writer, ex.Message));
            return;
        }
        coordinator.Tell(new CheckpointCopied(m.Step, m.Writer, null));
        Task.Run(() =>
        {
            try
            {
                return CheckpointIO.WriteShard(m, copies);
            }
            catch (Exception ex)
            {
                return new CheckpointShardWritten(m.Step, m.Writer, "", 0, "", [], ex.GetBaseException().Message);
            }
        }).PipeTo(coordinator);
    }

    private void BeginInstall(InstallPlan m)
    {
        var coordinator = Sender;
        _coordinator = coordinator;
        _context.Coordinator = coordinator;
        TrainingPlan next;
        TrainingPlan? previous;
        try
        {
            next = ToPlan(m.Epoch, m.Dp, m.Pp, m.StageStarts, m.StageEnds, m.Workers, m.ExpertOwner) with
            {
                Redundancy = m.Redundancy, Copies = m.ExpertCopies, Keepers = m.MirrorKeepers, Domains = m.Domains,
            };
            previous = m.Previous.Length == 0 ? null : ToPlan(m.Epoch - 1, 1, 1, [], [], m.Previous, []);
        }
        catch (Exception ex)
        {
            coordinator.Tell(new PlanFailed(m.Epoch, _info, $"bad plan: {ex.Message}"));
            return;
        }
        int rank = next.RankOf(_id);
        // A worker whose first plan is not the run's first (it joined a running job) holds seed values
        // the run has long trained past: drop them, so only units that arrive for it count as held.
        if (_context.Plan is null && previous is not null) _context.ReleaseAll();
        // Units leave before anything is released: export what this worker must send, post receives for
        // what it must get, and let the data plane carry both ways at once (no ordering, no deadlock).
        var sends = new List<Task>();
        var receives = new List<(UnitId Unit, Task<Frame> Frame)>();
        var cts = CancellationTokenSource.CreateLinkedTokenSource(_stopping);
        cts.CancelAfter(TimeSpan.FromSeconds(_config.Cluster.PlanTimeoutSeconds));
        _installCancel = cts;
        _installingEpoch = m.Epoch;
        try
        {
            foreach (var move in m.Moves)
            {
                var unit = UnitId.Parse(move.Unit);
                Int128 tag = StepTags.UnitTransfer(m.Epoch, _context.UnitIndex(unit), move.ToRank);
                if (previous is not null && previous.Workers[move.FromWorker].Id == _id)
                {
                    if (!_context.Holds(unit)) throw new InvalidOperationException($"asked to send unit {unit}, which this worker does not hold");
                    _context.MaybeInject(FaultPhase.Transfer, new Fence(m.Epoch, m.StartStep, 0));
                    var bytes = _context.Units[unit].Export();
                    sends.Add(_dataPlane.SendAsync(next.Workers[move.ToRank].DataEndpoint, tag, bytes, ElementType.UInt8, cancellationToken: cts.Token));
                }
                if (move.ToRank == rank) receives.Add((unit, _dataPlane.ReceiveAsync(tag, cts.Token)));
            }
        }
        catch (Exception ex)
        {
            cts.Dispose();
            _installCancel = null;
            coordinator.Tell(new PlanFailed(m.Epoch, _info, ex.Message));
            return;
        }
        Become(Installing);
        var context = _context;
        Task.Run(async () =>
        {
            long bytes = 0;
            try
            {
                // A resumed run's first plan: every worker's units come from the checkpoint, not the seed.
                if (m.Resume is { } resume && previous is null && rank >= 0)
                    CheckpointIO.Load(context, resume, next.HoldingsOf(rank, _config.Model));
                await Task.WhenAll(sends);
                foreach (var (unit, frameTask) in receives)
                {
                    using var frame = await frameTask;
                    bytes += frame.Payload.Length;
                    // Import verifies the unit's name, shapes and checksum before it touches anything.
                    context.Units[unit].Import(frame.Payload);
                    context.Received(unit);
                }
                return new TransfersDone(m, next, rank, coordinator, bytes, receives.Count, null);
            }
            catch (Exception ex)
            {
                return new TransfersDone(m, next, rank, coordinator, bytes, receives.Count, ex);
            }
        }).PipeTo(Self);
    }

    private void OnTransfersDone(TransfersDone d)
    {
        if (d.Error is not null)
        {
            FinishInstall(d.Coordinator, new PlanFailed(d.Plan.Epoch, _info, $"unit transfer failed: {d.Error.GetBaseException().Message}"));
            return;
        }
        try
        {
            _context.Install(d.Next, d.Rank);
        }
        catch (Exception ex)
        {
            FinishInstall(d.Coordinator, new PlanFailed(d.Plan.Epoch, _info, ex.Message));
            return;
        }
        var reconfigure = new Reconfigure(d.Next, d.Rank, d.Coordinator);
        var timeout = TimeSpan.FromSeconds(_config.Cluster.PlanTimeoutSeconds);
        var asks = _shards.Prepend(_stage).Append(_mirror).Select(c => c.Ask<Reconfigured>(reconfigure, timeout)).ToList();
        Task.WhenAll(asks).ContinueWith(t => new ChildrenReady(d.Plan, d.Rank, d.Coordinator, d.Bytes, d.Units, t.Exception,
            t.IsCompletedSuccessfully && t.Result[^1].Active)).PipeTo(Self);
    }

    private void OnChildrenReady(ChildrenReady r)
    {
        if (r.Error is not null)
        {
            FinishInstall(r.Coordinator, new PlanFailed(r.Plan.Epoch, _info, $"stage or shard did not reconfigure: {r.Error.GetBaseException().Message}"));
            return;
        }
        var plan = _context.ActivePlan;
        var shared = Enumerable.Range(0, _shards.Count)
            .Where(o => ExpertShardActor.IsShared(plan, r.Rank, o, _config.Model.DenseLayers)).ToArray();
        FinishInstall(r.Coordinator, new PlanInstalled(r.Plan.Epoch, _info, r.Rank, Self, _stage, shared,
            shared.Select(o => _shards[o]).ToArray(), r.Bytes, r.Units, _context.HeldCount)
        {
            Mirrors = r.MirrorActive ? [_mirror] : [],
        });
    }

    private void FinishInstall(IActorRef coordinator, IElasticMoEMessage reply)
    {
        _installCancel?.Dispose();
        _installCancel = null;
        if (reply is PlanFailed f) _log.Error("worker {0}: plan epoch {1} failed: {2}", _id, f.Epoch, f.Reason);
        coordinator.Tell(reply);
        Become(Ready);
        Stash.UnstashAll();
    }

    private static TrainingPlan ToPlan(int epoch, int dp, int pp, int[] starts, int[] ends, WorkerInfo[] workers, int[][] owners)
        => new(epoch, dp, pp, starts.Zip(ends, (a, b) => new StageRange(a, b)).ToArray(),
            workers.Select(w => new WorkerSlot(new WorkerId(w.NodeAddress, w.SystemUid, w.Device), w.DataEndpoint)).ToList(), owners);

}

/// <summary>Sends expert requests to shard actors, wherever they are, by their well-known paths.</summary>
internal sealed class ShardMessenger(ActorSystem system, WorkerContext context) : IShardMessenger
{
    private readonly Dictionary<(string, int, int), ActorSelection> _selections = new();
    private readonly object _gate = new();

    public void Send(int moeOrdinal, int ownerWorker, IElasticMoEMessage message)
    {
        var w = context.ActivePlan.Workers[ownerWorker];
        ActorSelection sel;
        lock (_gate)
        {
            if (!_selections.TryGetValue((w.NodeAddress, w.Device, moeOrdinal), out sel!))
            {
                sel = system.ActorSelection(DeviceWorker.ShardPath(w.NodeAddress, w.Device, moeOrdinal));
                _selections[(w.NodeAddress, w.Device, moeOrdinal)] = sel;
            }
        }
        // May run on libtorch's autograd thread (remote backward): no actor context there, so no sender.
        sel.Tell(message, ActorRefs.NoSender);
    }
}
