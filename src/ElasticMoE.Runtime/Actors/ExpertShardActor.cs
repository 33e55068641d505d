using ElasticMoE.Training;
using Akka.Actor;
using Akka.Event;
using ElasticMoE.Runtime.Engine;
using ElasticMoE.Runtime.Protocol;

namespace ElasticMoE.Runtime.Actors;

/// <summary>
/// Hosts the experts of one MoE layer that other workers call, on this worker (see
/// <see cref="ShardEngine"/>). One per MoE layer per worker for the worker's whole life, at a well-known
/// path; a plan that gives this worker none of the layer's shared experts leaves it idle.
/// </summary>
public sealed class ExpertShardActor : ReceiveActor
{
    private readonly WorkerContext _context;
    private readonly int _ordinal;
    private readonly ILoggingAdapter _log = Context.GetLogger();
    private ShardEngine? _engine;
    private IActorRef _coordinator = ActorRefs.Nobody;

    public ExpertShardActor(WorkerContext context, int ordinal)
    {
        _context = context;
        _ordinal = ordinal;
        Receive<Reconfigure>(OnReconfigure);
        Receive<IElasticMoEMessage>(OnMessage);
    }

    public static Props Props(WorkerContext context, int ordinal)
        => Akka.Actor.Props.Create(() => new ExpertShardActor(context, ordinal));

    // One libtorch thread on a thread of its own: a shard works beside its worker's stage on the same
    // cores, and every extra OpenMP team in the process makes libgomp throttle all of them (see DeviceWorker).
    protected override void PreStart() => TorchSharp.torch.set_num_threads(1);

    /// <summary>True when the plan gives rank <paramref name="rank"/> experts of this layer that other workers call.</summary>
    public static bool IsShared(Planning.TrainingPlan plan, int rank, int ordinal, int denseLayers)
        => rank >= 0 && plan.ExpertsOn(ordinal, rank).Length > 0 && !plan.ShardIsPrivate(ordinal, rank, denseLayers);

    private void OnReconfigure(Reconfigure m)
    {
        Configure(m.Plan, m.Rank, m.Coordinator);
        Sender.Tell(new Reconfigured(m.Plan.Epoch, _engine is not null));
    }

    private void Configure(Planning.TrainingPlan plan, int rank, IActorRef coordinator)
    {
        _engine?.Dispose();
        _engine = IsShared(plan, rank, _ordinal, _context.Config.Model.DenseLayers) ? new ShardEngine(_context, _ordinal) : null;
        _coordinator = coordinator;
    }

    private void OnMessage(IElasticMoEMessage message)
    {
        switch (message)
        {
            case ExpertForward m: Run(m.Fence, t => _engine!.Forward(m, t)); break;
            case ExpertBackward m: Run(m.Fence, t => _engine!.Backward(m, t)); break;
            case QueryExpertNorm m:
                var sender = Sender;
                Run(m.Fence, token =>
                {
                    var norms = _engine!.GradSumSq(m.Fence, token);
                    sender.Tell(new ExpertNorm(m.Fence, _context.Worker, _ordinal, GradClip.CanonicalTotal(norms)) { Norms = NamedSums.Of(norms) });
                });
                break;
            case ApplyUpdate m:
                var replyTo = Sender;
                Run(m.Fence, token =>
                {
                    var (applied, already) = _engine!.Apply(m, token);
                    replyTo.Tell(new UpdateApplied(m.Fence, _context.Worker, 0, applied, already));
                });
                break;
            case ReportParameters:
                if (_engine is not null) Sender.Tell(WorkerContext.Summarize(_context.Worker, _engine.Parameters));
                break;
            default: _log.Warning("shard: unexpected {0}", message.GetType().Name); break;
        }
    }

    private void Run(Fence fence, Action<CancellationToken> work)
    {
        if (_engine is null)
        {
            _log.Warning("shard L{0} of worker {1} holds no experts under this plan; {2} ignored", _ordinal, _context.Worker, fence);
            return;
        }
        if (_context.Enter(fence) is not { } token) return;   // an aborted attempt's late request
        try
        {
            work(token);
        }
        catch (Exception ex)
        {
            StepFailures.Handle(ex, _context, fence, _coordinator, _log, $"expert shard L{_ordinal}", $"expert shard L{_ordinal}: ");
        }
    }

    // Re-created after a failure: a new engine over the same units (see PipelineStageActor).
    protected override void PostRestart(Exception reason)
    {
        base.PostRestart(reason);
        if (_context.Plan is { } plan) Configure(plan, _context.Worker, _context.Coordinator);
    }

    protected override void PostStop() => _engine?.Dispose();
}
