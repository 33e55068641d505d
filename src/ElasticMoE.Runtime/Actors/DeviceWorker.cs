using Akka.Actor;
using Akka.Event;
using ElasticMoE.Configuration;
using ElasticMoE.Data;
using ElasticMoE.Planning;
using ElasticMoE.Runtime.DataPlane;
using ElasticMoE.Runtime.Engine;
using ElasticMoE.Runtime.Protocol;

namespace ElasticMoE.Runtime.Actors;

/// <summary>
/// The GPU worker: owns one device, its thread budget and its copy of the model, and hosts what the
/// plan puts on it — one pipeline stage and the expert shards of any MoE layer — as child actors on a
/// dedicated thread each (or, for the worker that owns the process's compute loop, its stage and
/// private shards on the loop's thread), so a stage blocked on a remote expert never blocks this
/// node's shards.
/// </summary>
public sealed class DeviceWorker : ReceiveActor
{
    public const string ComputeDispatcher = "elasticmoe-compute-dispatcher";

    private readonly ElasticMoEConfig _config;
    private readonly TextCorpus _corpus;
    private readonly DataPlaneNode _dataPlane;
    private readonly string _nodeAddress;
    private readonly int _device;
    private readonly ILoggingAdapter _log = Context.GetLogger();
    private WorkerContext? _context;

    private readonly Hosting.ComputeLoop? _loop;

    private readonly CancellationToken _stopping;

    public DeviceWorker(ElasticMoEConfig config, TextCorpus corpus, DataPlaneNode dataPlane, string nodeAddress, int device,
        Hosting.ComputeLoop? loop = null, CancellationToken stopping = default)
    {
        _loop = loop;
        _stopping = stopping;
        _config = config;
        _corpus = corpus;
        _dataPlane = dataPlane;
        _nodeAddress = nodeAddress;
        _device = device;
        Receive<AssignPlan>(OnAssignPlan);
    }

    public static Props Props(ElasticMoEConfig config, TextCorpus corpus, DataPlaneNode dataPlane, string nodeAddress, int device,
        Hosting.ComputeLoop? loop = null, CancellationToken stopping = default)
        => Akka.Actor.Props.Create(() => new DeviceWorker(config, corpus, dataPlane, nodeAddress, device, loop, stopping));

    /// <summary>Path of the expert shard of (worker, MoE ordinal) under a node's address.</summary>
    public static string ShardPath(string nodeAddress, int device, int ordinal) => $"{nodeAddress}/user/node/worker-{device}/shard-{ordinal}";

    protected override SupervisorStrategy SupervisorStrategy()
        => new OneForOneStrategy(maxNrOfRetries: 3, withinTimeRange: TimeSpan.FromMinutes(1), localOnlyDecider: ex =>
        {
            _log.Error(ex, "stage or shard failed");
            return Directive.Restart;
        });

    private void OnAssignPlan(AssignPlan m)
    {
        var workers = m.Workers.Select(w => new WorkerSlot(new WorkerId(w.NodeAddress, w.SystemUid, w.Device), w.DataEndpoint)).ToList();
        var plan = new TrainingPlan(m.Epoch, m.Dp, m.Pp,
            m.StageStarts.Zip(m.StageEnds, (a, b) => new StageRange(a, b)).ToArray(), workers, m.ExpertOwner);
        int myRank = workers.FindIndex(w => w.NodeAddress == _nodeAddress && w.Device == _device);
        if (myRank < 0)
        {
            _log.Info("worker {0} is not in plan epoch {1}; idle", _device, m.Epoch);
            return;
        }
        foreach (var child in Context.GetChildren()) Context.Stop(child);
        if (_context is null)
        {
            // Built on this (shared) dispatcher thread with one libtorch thread: an OpenMP team left
            // behind here would make the compute threads' own teams crawl (libgomp throttles every team
            // once it manages more threads than there are cores).
            TorchSharp.torch.set_num_threads(1);
            _context = new WorkerContext(_config, _corpus, _dataPlane, plan, myRank, _stopping);
        }
        _context.Install(plan, myRank);
        var coordinator = Sender;
        var stageName = $"stage-e{m.Epoch}";
        // With a compute loop, the stage runs on it, and so do the shards only this stage calls (their
        // experts run inside the stage's graph; the shard just norms and updates them). A shard that
        // takes requests from other workers needs a thread of its own: the stage's may be blocked
        // waiting for a remote shard that in turn waits for this one.
        var stageDispatcher = _loop is null ? ComputeDispatcher : Hosting.ComputeLoopDispatcher.Id;
        Context.ActorOf(PipelineStageActor.Props(_context, coordinator, _loop).WithDispatcher(stageDispatcher), stageName);
        for (int ordinal = 0; ordinal < plan.ExpertOwner.Length; ordinal++)
        {
            if (plan.ExpertsOn(ordinal, myRank).Length == 0) continue;
            bool isPrivate = plan.ShardIsPrivate(ordinal, myRank, _config.Model.DenseLayers);
            Context.ActorOf(ExpertShardActor.Props(_context, ordinal, coordinator)
                .WithDispatcher(isPrivate ? stageDispatcher : ComputeDispatcher), $"shard-{ordinal}");
        }
    }

    protected override void PostStop() => _context?.Dispose();
}

/// <summary>Sends expert requests to shard actors, wherever they are, by their well-known paths.</summary>
internal sealed class ShardMessenger(ActorSystem system, WorkerContext context) : IShardMessenger
{
    private readonly Dictionary<(int, int), ActorSelection> _selections = new();
    private readonly object _gate = new();

    public void Send(int moeOrdinal, int ownerWorker, IElasticMoEMessage message)
    {
        ActorSelection sel;
        lock (_gate)
        {
            if (!_selections.TryGetValue((moeOrdinal, ownerWorker), out sel!))
            {
                var w = context.Plan.Workers[ownerWorker];
                sel = system.ActorSelection(DeviceWorker.ShardPath(w.NodeAddress, w.Device, moeOrdinal));
                _selections[(moeOrdinal, ownerWorker)] = sel;
            }
        }
        // May run on libtorch's autograd thread (remote backward): no actor context there, so no sender.
        sel.Tell(message, ActorRefs.NoSender);
    }
}
