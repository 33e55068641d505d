using MessagePack;

namespace ElasticMoE.Runtime.Protocol;

// The training protocol: every message between coordinator, node agents, pipeline stages and expert
// shards. Control only: tensor bytes never ride in these, they go over the data plane under the tags
// named here. All are MessagePack objects under IElasticMoEMessage, so remoting uses our serializer.

/// <summary>A worker (device) as described by its node when registering.</summary>
[MessagePackObject, Manifest("t.WorkerInfo")]
public sealed record WorkerInfo([property: Key(0)] string NodeAddress, [property: Key(1)] int Device, [property: Key(2)] string DataEndpoint, [property: Key(3)] long SystemUid);

/// <summary>Node agent → coordinator: this node is up with these devices. Retried until acknowledged.</summary>
[MessagePackObject, Manifest("t.RegisterNode")]
public sealed record RegisterNode(
    [property: Key(0)] string NodeAddress,
    [property: Key(1)] string[] DataEndpoints,
    [property: Key(2)] string ModelFingerprint,
    [property: Key(3)] long Seed,
    [property: Key(4)] long SystemUid) : IElasticMoEMessage;

/// <summary>Coordinator → node agent: registration accepted; the node's workers will receive a plan.</summary>
[MessagePackObject, Manifest("t.NodeAccepted")]
public sealed record NodeAccepted([property: Key(0)] string NodeAddress) : IElasticMoEMessage;

/// <summary>Coordinator → node agent: registration refused, with the reason (e.g. a different model config).</summary>
[MessagePackObject, Manifest("t.NodeRefused")]
public sealed record NodeRefused([property: Key(0)] string NodeAddress, [property: Key(1)] string Reason) : IElasticMoEMessage;

/// <summary>
/// Coordinator → worker: the plan. Workers are listed in plan order; each worker learns its index from
/// its own address and device. Stage ranges and expert owners are those of <c>TrainingPlan</c>.
/// </summary>
[MessagePackObject, Manifest("t.AssignPlan")]
public sealed record AssignPlan(
    [property: Key(0)] int Epoch,
    [property: Key(1)] int Dp,
    [property: Key(2)] int Pp,
    [property: Key(3)] int[] StageStarts,
    [property: Key(4)] int[] StageEnds,
    [property: Key(5)] WorkerInfo[] Workers,
    [property: Key(6)] int[][] ExpertOwner,
    [property: Key(7)] long StartStep) : IElasticMoEMessage;

/// <summary>Worker → coordinator: the plan is installed; stage and shards are ready for steps.</summary>
[MessagePackObject, Manifest("t.PlanReady")]
public sealed record PlanReady([property: Key(0)] int Epoch, [property: Key(1)] int Worker, [property: Key(2)] int Shards) : IElasticMoEMessage;

/// <summary>Expert shard → coordinator: the shard of (worker, MoE layer ordinal) is ready.</summary>
[MessagePackObject, Manifest("t.ShardReady")]
public sealed record ShardReady([property: Key(0)] int Epoch, [property: Key(1)] int Worker, [property: Key(2)] int MoEOrdinal) : IElasticMoEMessage;

/// <summary>Coordinator → every worker: run forward and backward of your share of this step.</summary>
[MessagePackObject, Manifest("t.RunStep")]
public sealed record RunStep([property: Key(0)] int Epoch, [property: Key(1)] long Step) : IElasticMoEMessage;

/// <summary>
/// Worker → coordinator: forward and backward are done and dense gradients are all-reduced.
/// LossSum is the sum of micro-batch losses (last stage only, else 0).
/// GradSumSq is the squared L2 norm of every gradient this stage's backward completed: its (already
/// reduced) dense gradients, plus the experts private to it (see <c>TrainingPlan.ExpertsPrivateTo</c>),
/// whose shards therefore are not asked for a norm.
/// ExpertCounts: [moe layer ordinal of this stage's layers][expert] tokens routed by this worker.
/// </summary>
[MessagePackObject, Manifest("t.StepComputed")]
public sealed record StepComputed(
    [property: Key(0)] int Epoch,
    [property: Key(1)] long Step,
    [property: Key(2)] int Worker,
    [property: Key(3)] double LossSum,
    [property: Key(4)] int MicroBatches,
    [property: Key(5)] double GradSumSq,
    [property: Key(6)] int[] MoELayers,
    [property: Key(7)] long[][] ExpertCounts) : IElasticMoEMessage;

/// <summary>Coordinator → shard taking requests from other workers: every contribution of the step has arrived; report your gradient norm.</summary>
[MessagePackObject, Manifest("t.QueryExpertNorm")]
public sealed record QueryExpertNorm([property: Key(0)] int Epoch, [property: Key(1)] long Step) : IElasticMoEMessage;

[MessagePackObject, Manifest("t.ExpertNorm")]
public sealed record ExpertNorm([property: Key(0)] int Epoch, [property: Key(1)] long Step, [property: Key(2)] int Worker, [property: Key(3)] double SumSq) : IElasticMoEMessage;

/// <summary>
/// Coordinator → worker: apply the optimizer with this rate and clip coefficient, and move the router
/// biases by the step's total loads ([moe layer ordinal][expert], summed over all replicas).
/// </summary>
[MessagePackObject, Manifest("t.ApplyUpdate")]
public sealed record ApplyUpdate(
    [property: Key(0)] int Epoch,
    [property: Key(1)] long Step,
    [property: Key(2)] double Lr,
    [property: Key(3)] double ClipScale,
    [property: Key(4)] long[][] LayerLoads,
    [property: Key(5)] bool Checksum) : IElasticMoEMessage;

/// <summary>Worker → coordinator: the update is applied. Checksum is of this stage's dense parameters when asked, else 0.</summary>
[MessagePackObject, Manifest("t.UpdateApplied")]
public sealed record UpdateApplied([property: Key(0)] int Epoch, [property: Key(1)] long Step, [property: Key(2)] int Worker, [property: Key(3)] ulong DenseChecksum) : IElasticMoEMessage;

/// <summary>Coordinator → worker: compute validation loss on your share of the fixed validation batches.</summary>
[MessagePackObject, Manifest("t.RunEval")]
public sealed record RunEval([property: Key(0)] int Epoch, [property: Key(1)] long Step) : IElasticMoEMessage;

[MessagePackObject, Manifest("t.EvalComputed")]
public sealed record EvalComputed([property: Key(0)] int Epoch, [property: Key(1)] long Step, [property: Key(2)] int Worker, [property: Key(3)] double LossSum, [property: Key(4)] int Batches) : IElasticMoEMessage;

/// <summary>A worker could not do what it was asked (diverged loss, lost peer, …). The coordinator stops the run.</summary>
[MessagePackObject, Manifest("t.WorkerFailed")]
public sealed record WorkerFailed([property: Key(0)] int Epoch, [property: Key(1)] long Step, [property: Key(2)] int Worker, [property: Key(3)] string Reason) : IElasticMoEMessage;

/// <summary>
/// Stage → expert shard: tokens for your experts are on the data plane under DataTag, rows grouped by
/// expert (ascending) with Counts rows each. Reply on the data plane to ReplyEndpoint under ReplyTag.
/// With Train set, keep the graph for the matching <see cref="ExpertBackward"/>.
/// </summary>
[MessagePackObject, Manifest("t.ExpertForward")]
public sealed record ExpertForward(
    [property: Key(0)] int Epoch,
    [property: Key(1)] long Step,
    [property: Key(2)] int Requester,
    [property: Key(3)] int MicroBatch,
    [property: Key(4)] long[] Counts,
    [property: Key(5)] long DataTag,
    [property: Key(6)] long ReplyTag,
    [property: Key(7)] string ReplyEndpoint,
    [property: Key(8)] bool Train) : IElasticMoEMessage;

/// <summary>Stage → expert shard: output gradients under DataTag; reply with input gradients under ReplyTag.</summary>
[MessagePackObject, Manifest("t.ExpertBackward")]
public sealed record ExpertBackward(
    [property: Key(0)] int Epoch,
    [property: Key(1)] long Step,
    [property: Key(2)] int Requester,
    [property: Key(3)] int MicroBatch,
    [property: Key(4)] long DataTag,
    [property: Key(5)] long ReplyTag,
    [property: Key(6)] string ReplyEndpoint) : IElasticMoEMessage;

/// <summary>Coordinator → stages and shards: report a summary of the parameters you own (end of run).</summary>
[MessagePackObject, Manifest("t.ReportParameters")]
public sealed record ReportParameters([property: Key(0)] int Epoch) : IElasticMoEMessage;

/// <summary>Per owned parameter: its name, the sum of its values and its L2 norm (float64).</summary>
[MessagePackObject, Manifest("t.ParameterSummary")]
public sealed record ParameterSummary(
    [property: Key(0)] int Worker,
    [property: Key(1)] string[] Names,
    [property: Key(2)] double[] Sums,
    [property: Key(3)] double[] Norms) : IElasticMoEMessage;

/// <summary>
/// How the coordinator ended the run, as it tells its nodes in <see cref="Shutdown"/>. A node's exit
/// status follows this value, never the wording of the reason. Failed is 0, so a peer that predates
/// the field (or forgets to set it) reads as a failure, never as a success.
/// </summary>
public enum RunEnd
{
    Failed = 0,
    Finished = 1,
    /// <summary>Stopped early on request (<see cref="StopRun"/>), after a complete step.</summary>
    Stopped = 2,
}

/// <summary>Coordinator → node agents and workers: the run is over (<paramref name="End"/> says how); stop.</summary>
[MessagePackObject, Manifest("t.Shutdown")]
public sealed record Shutdown([property: Key(0)] string Reason, [property: Key(1)] RunEnd End = RunEnd.Failed) : IElasticMoEMessage;
