using Akka.Actor;
using Akka.Event;
using ElasticMoE.Runtime.DataPlane;
using ElasticMoE.Runtime.Engine;
using ElasticMoE.Runtime.Protocol;

namespace ElasticMoE.Runtime.Actors;

/// <summary>
/// Keeps this worker's mirrors of its buddies' units current (see <see cref="MirrorParts"/>): at each step
/// attempt it takes their gradients off the data plane and acknowledges them, and with the step's update it
/// applies them. One per device worker for the worker's whole life, reconfigured in place by each plan; idle
/// while the plan gives it nothing to mirror.
/// </summary>
public sealed class MirrorKeeperActor : ReceiveActor
{
    private sealed record GradientsArrived(Fence Fence, int Source, int Part, Frame? Frame, Exception? Error);

    private readonly WorkerContext _context;
    private readonly ILoggingAdapter _log = Context.GetLogger();
    private MirrorEngine? _engine;
    private IActorRef _coordinator = ActorRefs.Nobody;

    public MirrorKeeperActor(WorkerContext context)
    {
        _context = context;
        Receive<Reconfigure>(OnReconfigure);
        Receive<RunStep>(OnRunStep);
        Receive<GradientsArrived>(OnArrived);
        Receive<ApplyUpdate>(OnApply);
        Receive<IElasticMoEMessage>(_ => { });
    }

    public static Props Props(WorkerContext context) => Akka.Actor.Props.Create(() => new MirrorKeeperActor(context));

    // One libtorch thread, like the shards: it computes beside the worker's stage on the same cores.
    protected override void PreStart() => TorchSharp.torch.set_num_threads(1);

    private void OnReconfigure(Reconfigure m)
    {
        Configure(m.Rank, m.Coordinator);
        Sender.Tell(new Reconfigured(m.Plan.Epoch, _engine is not null));
    }

    private void Configure(int rank, IActorRef coordinator)
    {
        _engine?.Dispose();
        _engine = rank < 0 ? null : new MirrorEngine(_context);
        if (_engine is { IsEmpty: true })
        {
            _engine.Dispose();
            _engine = null;
        }
        _coordinator = coordinator;
    }

    private void OnRunStep(RunStep m)
    {
        if (_engine is null || _context.Enter(m.Fence) is not { } token) return;
        foreach (var (source, part, frame) in _engine.Begin(m.Fence, token))
            frame.ContinueWith(t => new GradientsArrived(m.Fence, source, part, t.IsCompletedSuccessfully ? t.Result : null,
                t.IsCompletedSuccessfully ? null : (Exception?)t.Exception?.GetBaseException() ?? new OperationCanceledException()),
                TaskContinuationOptions.ExecuteSynchronously).PipeTo(Self);
    }

    private void OnArrived(GradientsArrived m)
    {
        if (m.Error is not null)
        {
            // Cancelled with its attempt (aborted, or the node is stopping): nothing to report.
            if (m.Error is OperationCanceledException || _context.Stopping.IsCancellationRequested) return;
            _coordinator.Tell(new WorkerFailed(m.Fence, _context.Worker, PipelineStageActor.Classify(m.Error),
                $"mirror of rank {m.Source} part {m.Part}: {m.Error.Message}"));
            return;
        }
        if (_engine is null)
        {
            m.Frame!.Dispose();
            return;
        }
        var fence = m.Fence;
        _engine.Received(fence, m.Source, m.Part, m.Frame!).ContinueWith(t =>
        {
            if (t.IsFaulted && !_context.Stopping.IsCancellationRequested)
                _coordinator.Tell(new WorkerFailed(fence, _context.Worker, FailureKind.Error,
                    $"mirror acknowledgement to rank {m.Source}: {t.Exception!.GetBaseException().Message}"));
        }, TaskContinuationOptions.ExecuteSynchronously);
    }

    private void OnApply(ApplyUpdate m)
    {
        if (_engine is null || _context.Enter(m.Fence) is null) return;
        try
        {
            var (applied, already) = _engine.Apply(m);
            Sender.Tell(new UpdateApplied(m.Fence, _context.Worker, 0, applied, already));
        }
        catch (Exception ex)
        {
            StepFailures.Handle(ex, _context, m.Fence, Sender, _log, "mirror keeper", "mirror keeper: ");
        }
    }

    // Re-created after a failure: the mirrors are units of the worker's context; only the received
    // gradients of the attempt in flight are lost, and that attempt is redone.
    protected override void PostRestart(Exception reason)
    {
        base.PostRestart(reason);
        if (_context.Plan is not null) Configure(_context.Worker, _context.Coordinator);
    }

    protected override void PostStop() => _engine?.Dispose();
}
