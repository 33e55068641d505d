using Akka.Actor;
using Akka.Event;
using ElasticMoE.Runtime.Engine;
using ElasticMoE.Runtime.Protocol;

namespace ElasticMoE.Runtime.Actors;

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
        catch (Exception ex) when (_context.Stopping.IsCancellationRequested)
        {
            // The node is stopping (told to by its coordinator, or leaving the cluster on SIGTERM) and
            // cancelled this step's waits on purpose: not a worker failure. The coordinator learns of
            // the departure from the membership, naming the node.
            _log.Info("stage of worker {0}: step {1} abandoned, the node is stopping ({2})", _context.Worker, step, ex.GetBaseException().Message);
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
