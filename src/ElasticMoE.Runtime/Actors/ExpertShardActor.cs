using Akka.Actor;
using Akka.Event;
using ElasticMoE.Runtime.Engine;
using ElasticMoE.Runtime.Protocol;

namespace ElasticMoE.Runtime.Actors;

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

    // One libtorch thread on a thread of its own: a shard works beside its worker's stage on the same
    // cores, and every extra OpenMP team in the process makes libgomp throttle all of them (see
    // DeviceWorker). A shard on its stage's compute loop shares the stage's thread and its budget.
    protected override void PreStart()
    {
        if (Context.Props.Dispatcher != Hosting.ComputeLoopDispatcher.Id) TorchSharp.torch.set_num_threads(1);
    }

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
        catch (Exception ex) when (_context.Stopping.IsCancellationRequested)
        {
            // The node is stopping: a cancelled wait, not a failure (see PipelineStageActor).
            _log.Info("expert shard L{0} of worker {1}: step {2} abandoned, the node is stopping ({3})", _engine.MoEOrdinal, _context.Worker, step, ex.GetBaseException().Message);
        }
        catch (Exception ex)
        {
            _log.Error(ex, "expert shard L{0} of worker {1} failed at step {2}", _engine.MoEOrdinal, _context.Worker, step);
            _coordinator.Tell(new WorkerFailed(_context.Plan.Epoch, step, _context.Worker, $"expert shard L{_engine.MoEOrdinal}: {ex.GetBaseException().Message}"));
        }
    }

    protected override void PostStop() => _engine.Dispose();
}
