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
/// dedicated thread each, so a stage blocked on a remote expert never blocks this node's shards.
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
        var workers = m.Workers.Select((w, i) => new WorkerSlot(i, w.NodeAddress, w.Device, w.DataEndpoint)).ToList();
        var plan = new TrainingPlan(m.Epoch, m.Dp, m.Pp,
            m.StageStarts.Zip(m.StageEnds, (a, b) => new StageRange(a, b)).ToArray(), workers, m.ExpertOwner);
        var me = workers.FirstOrDefault(w => w.NodeAddress == _nodeAddress && w.Device == _device);
        if (me is null)
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
            _context = new WorkerContext(_config, _corpus, _dataPlane, plan, me.Index, _stopping);
        }
        _context.Install(plan, me.Index);
        var coordinator = Sender;
        var stageName = $"stage-e{m.Epoch}";
        Context.ActorOf(PipelineStageActor.Props(_context, coordinator, _loop).WithDispatcher(ComputeDispatcher), stageName);
        for (int ordinal = 0; ordinal < plan.ExpertOwner.Length; ordinal++)
        {
            if (plan.ExpertsOn(ordinal, me.Index).Length == 0) continue;
            Context.ActorOf(ExpertShardActor.Props(_context, ordinal, coordinator).WithDispatcher(ComputeDispatcher), $"shard-{ordinal}");
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

/// <summary>Runs one pipeline stage's share of each step (see <see cref="StageEngine"/>).</summary>
public sealed class PipelineStageActor : ReceiveActor
{
    private readonly WorkerContext _context;
    private readonly StageEngine _engine;
    private readonly Hosting.ComputeLoop? _loop;
    private readonly ILoggingAdapter _log = Context.GetLogger();

    public PipelineStageActor(WorkerContext context, IActorRef coordinator, Hosting.ComputeLoop? loop = null)
    {
        _context = context;
        _loop = loop;
        _engine = new StageEngine(context, new ShardMessenger(Context.System, context));
        Receive<IElasticMoEMessage>(OnMessage);
        coordinator.Tell(new PlanReady(context.Plan.Epoch, context.Worker, context.Plan.ExpertOwner.Count(o => o.Contains(context.Worker))));
    }

    public static Props Props(WorkerContext context, IActorRef coordinator, Hosting.ComputeLoop? loop = null)
        => Akka.Actor.Props.Create(() => new PipelineStageActor(context, coordinator, loop));

    // The stage's torch work runs on the compute loop's thread when it has one (see ComputeLoop).
    // The loop's thread belongs to the process, so set this worker's thread budget on it each time.
    private T Compute<T>(Func<T> work) => _loop is null ? work() : _loop.Invoke(() =>
    {
        Training.TorchSetup.ApplyThreads(_context.Config);
        return work();
    });

    // libtorch's intra-op thread count is per OS thread (OpenMP), and this actor has a thread of its own.
    protected override void PreStart() => Training.TorchSetup.ApplyThreads(_context.Config);

    private void OnMessage(IElasticMoEMessage message)
    {
        var epoch = _context.Plan.Epoch;
        long step = -1;
        try
        {
            switch (message)
            {
                case RunStep m: step = m.Step; Sender.Tell(Compute(() => _engine.RunStep(m.Step))); break;
                case ApplyUpdate m: step = m.Step; Sender.Tell(Compute(() => _engine.Apply(m))); break;
                case RunEval m: step = m.Step; Sender.Tell(Compute(() => _engine.Evaluate(m.Step))); break;
                case ReportParameters: Sender.Tell(WorkerContext.Summarize(_context.Worker, _engine.DenseParameters)); break;
                default: _log.Warning("stage: unexpected {0}", message.GetType().Name); break;
            }
        }
        catch (Exception ex)
        {
            // Reported, not thrown: a diverged loss or a lost peer is the run's problem, which the
            // coordinator decides about; restarting this actor would only lose the step's graph.
            _log.Error(ex, "stage of worker {0} failed at step {1}", _context.Worker, step);
            Sender.Tell(new WorkerFailed(epoch, step, _context.Worker, ex.GetBaseException().Message));
        }
    }

    protected override void PostStop() => _engine.Dispose();
}

/// <summary>Hosts the experts of one MoE layer on this worker (see <see cref="ShardEngine"/>).</summary>
public sealed class ExpertShardActor : ReceiveActor
{
    private readonly WorkerContext _context;
    private readonly ShardEngine _engine;
    private readonly IActorRef _coordinator;
    private readonly ILoggingAdapter _log = Context.GetLogger();

    public ExpertShardActor(WorkerContext context, int ordinal, IActorRef coordinator)
    {
        _context = context;
        _coordinator = coordinator;
        _engine = new ShardEngine(context, ordinal);
        Receive<IElasticMoEMessage>(OnMessage);
        coordinator.Tell(new ShardReady(context.Plan.Epoch, context.Worker, ordinal));
    }

    public static Props Props(WorkerContext context, int ordinal, IActorRef coordinator)
        => Akka.Actor.Props.Create(() => new ExpertShardActor(context, ordinal, coordinator));

    // One libtorch thread: a shard works beside its worker's stage on the same cores, and every extra
    // OpenMP team in the process makes libgomp throttle all of them (see DeviceWorker).
    protected override void PreStart() => TorchSharp.torch.set_num_threads(1);

    private void OnMessage(IElasticMoEMessage message)
    {
        long step = -1;
        try
        {
            switch (message)
            {
                case ExpertForward m: step = m.Step; _engine.Forward(m); break;
                case ExpertBackward m: step = m.Step; _engine.Backward(m); break;
                case QueryExpertNorm m: step = m.Step; Sender.Tell(new ExpertNorm(m.Epoch, m.Step, _context.Worker, _engine.GradSumSq())); break;
                case ApplyUpdate m: step = m.Step; _engine.Apply(m); Sender.Tell(new UpdateApplied(m.Epoch, m.Step, _context.Worker, 0)); break;
                case ReportParameters: Sender.Tell(WorkerContext.Summarize(_context.Worker, _engine.Parameters)); break;
                default: _log.Warning("shard: unexpected {0}", message.GetType().Name); break;
            }
        }
        catch (Exception ex)
        {
            _log.Error(ex, "expert shard L{0} of worker {1} failed at step {2}", _engine.MoEOrdinal, _context.Worker, step);
            _coordinator.Tell(new WorkerFailed(_context.Plan.Epoch, step, _context.Worker, $"expert shard L{_engine.MoEOrdinal}: {ex.GetBaseException().Message}"));
        }
    }

    protected override void PostStop() => _engine.Dispose();
}
