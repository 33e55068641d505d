using Akka.Actor;
using Akka.Event;
using ElasticMoE.Runtime.Engine;
using ElasticMoE.Runtime.Protocol;

namespace ElasticMoE.Runtime.Actors;

/// <summary>A stage, shard or mirror keeper failed in a way nobody planned for: re-create it in place.</summary>
public sealed class WorkerCrashedException(string message, Exception inner) : Exception(message, inner);

/// <summary>How the actors that compute steps (stage, shard, mirror keeper) handle a failed attempt.</summary>
internal static class StepFailures
{
    /// <summary>
    /// Reports the failure to <paramref name="coordinator"/> typed (it redoes the attempt, or stops the run
    /// for a diverged loss or lost state). A failure of no known kind — a bug, an engine left inconsistent —
    /// is then thrown, and the device worker's supervisor re-creates the actor in place from the units in
    /// its worker's context (bounded by <c>cluster.worker-restarts</c> a minute). While the node stops, waits
    /// are cancelled on purpose: that is logged, not reported.
    /// </summary>
    public static void Handle(Exception ex, WorkerContext ctx, Fence fence, IActorRef coordinator, ILoggingAdapter log, string who, string reasonPrefix = "")
    {
        if (ctx.Stopping.IsCancellationRequested)
        {
            log.Info("{0} of worker {1}: {2} abandoned, the node is stopping ({3})", who, ctx.Worker, fence, ex.GetBaseException().Message);
            return;
        }
        var kind = PipelineStageActor.Classify(ex);
        if (kind is FailureKind.Error or FailureKind.Diverged) log.Error(ex, "{0} of worker {1} failed at {2}", who, ctx.Worker, fence);
        coordinator.Tell(new WorkerFailed(fence, ctx.Worker, kind, reasonPrefix + ex.GetBaseException().Message));
        if (kind == FailureKind.Error) throw new WorkerCrashedException($"{who} of worker {ctx.Worker} failed at {fence}", ex);
    }
}
