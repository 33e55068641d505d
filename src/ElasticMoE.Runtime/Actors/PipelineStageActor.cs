using Akka.Actor;
using Akka.Event;
using ElasticMoE.Runtime.Engine;
using ElasticMoE.Runtime.Protocol;

namespace ElasticMoE.Runtime.Actors;

/// <summary>
/// Runs one pipeline stage's share of each step (see <see cref="StageEngine"/>). Lives as long as its
/// device worker: a new plan reconfigures it in place (a new engine over the units the plan gives its
/// worker), so the actor is the same incarnation across re-plans.
/// </summary>
public sealed class PipelineStageActor : ReceiveActor
{
    private readonly WorkerContext _context;
    private readonly IShardMessenger _messenger;
    private readonly Hosting.ComputeLoop? _loop;
    private readonly ILoggingAdapter _log = Context.GetLogger();
    private StageEngine? _engine;

    public PipelineStageActor(WorkerContext context, Hosting.ComputeLoop? loop = null)
    {
        _context = context;
        _loop = loop;
        _messenger = new ShardMessenger(Context.System, context);
        Receive<Reconfigure>(OnReconfigure);
        Receive<IElasticMoEMessage>(OnMessage);
    }

    public static Props Props(WorkerContext context, Hosting.ComputeLoop? loop = null)
        => Akka.Actor.Props.Create(() => new PipelineStageActor(context, loop));

    // The stage's torch work runs on the compute loop's thread when it has one (see ComputeLoop).
    // The loop's thread belongs to the process, so set this worker's thread budget on it each time.
    private T Compute<T>(Func<T> work) => _loop is null ? work() : _loop.Invoke(() =>
    {
        Training.TorchSetup.ApplyThreads(_context.Config);
        return work();
    });

    // libtorch's intra-op thread count is per OS thread (OpenMP), and this actor has a thread of its own.
    protected override void PreStart() => Training.TorchSetup.ApplyThreads(_context.Config);

    private void OnReconfigure(Reconfigure m)
    {
        Configure(m.Rank);
        Sender.Tell(new Reconfigured(m.Plan.Epoch, _engine is not null));
    }

    private void Configure(int rank)
    {
        _engine?.Detach();
        _engine = rank < 0 ? null : Compute(() => new StageEngine(_context, _messenger));
    }

    private void OnMessage(IElasticMoEMessage message)
    {
        switch (message)
        {
            case RunStep m: Run(m.Fence, token => _engine!.RunStep(m.Fence, token)); break;
            case RunEval m: Run(m.Fence, token => _engine!.Evaluate(m.Fence, token)); break;
            case ApplyUpdate m: Run(m.Fence, _ => _engine!.Apply(m)); break;
            case ReportParameters:
                if (_engine is not null) Sender.Tell(WorkerContext.Summarize(_context.Worker, _engine.OwnedParameters));
                break;
            default: _log.Warning("stage: unexpected {0}", message.GetType().Name); break;
        }
    }

    // Stale attempts are ignored; failures are reported, typed: a diverged loss or a lost peer is the
    // run's problem, which the coordinator decides about (redo the attempt or stop). Only a failure of no
    // known kind is also thrown, to have this actor re-created in place (StepFailures).
    private void Run(Fence fence, Func<CancellationToken, IElasticMoEMessage> work)
    {
        if (_engine is null)
        {
            _log.Warning("stage of an idle worker got {0}; ignored", fence);
            return;
        }
        if (_context.Enter(fence) is not { } token) return;
        try
        {
            Sender.Tell(Compute(() => work(token)));
        }
        catch (Exception ex)
        {
            StepFailures.Handle(ex, _context, fence, Sender, _log, "stage");
        }
    }

    // Re-created after a failure: a new engine over the installed plan's units, which live in the worker's
    // context, not here; built before the next message (the redo of the step) is handled.
    protected override void PostRestart(Exception reason)
    {
        base.PostRestart(reason);
        if (_context.Active) Configure(_context.Worker);
    }

    public static FailureKind Classify(Exception ex) => ex switch
    {
        AttemptAbortedException or OperationCanceledException => FailureKind.Aborted,
        InjectedFaultException => FailureKind.Injected,
        TimeoutException => FailureKind.Timeout,
        Training.TrainingDivergedException => FailureKind.Diverged,
        InvalidOperationException { InnerException: { } inner } => Classify(inner),
        AggregateException { InnerException: { } inner } => Classify(inner),
        _ => FailureKind.Error,
    };

    protected override void PostStop() => _engine?.Detach();
}
