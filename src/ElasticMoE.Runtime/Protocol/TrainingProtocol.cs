using MessagePack;

namespace ElasticMoE.Runtime.Protocol;

// The training protocol: every message between coordinator, node agents, device workers, pipeline
// stages and expert shards. Control only: tensor bytes never ride in these, they go over the data plane
// under the tags named here. All are MessagePack objects under IElasticMoEMessage, so remoting uses our
// serializer. Every message of a step carries its attempt's Fence: a message of another attempt is
// stale, and every receiver drops it.

/// <summary>
/// One attempt at one step under one plan: (epoch, step, attempt). The coordinator can abort an attempt
/// in any phase and redo the step as attempt + 1 from unchanged state; tags and messages of the aborted
/// attempt can then never be taken for the redo's. Ordered: a later fence is greater.
/// </summary>
[MessagePackObject]
public readonly record struct Fence([property: Key(0)] int Epoch, [property: Key(1)] long Step, [property: Key(2)] int Attempt) : IComparable<Fence>
{
    public int CompareTo(Fence other)
    {
        int c = Epoch.CompareTo(other.Epoch);
        if (c != 0) return c;
        c = Step.CompareTo(other.Step);
        return c != 0 ? c : Attempt.CompareTo(other.Attempt);
    }

    public static bool operator <(Fence a, Fence b) => a.CompareTo(b) < 0;
    public static bool operator >(Fence a, Fence b) => a.CompareTo(b) > 0;
    public static bool operator <=(Fence a, Fence b) => a.CompareTo(b) <= 0;
    public static bool operator >=(Fence a, Fence b) => a.CompareTo(b) >= 0;

    public override string ToString() => $"e{Epoch}/s{Step}/a{Attempt}";
}

/// <summary>Why a worker could not finish what it was asked: decides whether the coordinator redoes the attempt.</summary>
public enum FailureKind
{
    /// <summary>Any other exception: the attempt is redone (bounded), state is unchanged.</summary>
    Error = 0,
    /// <summary>The attempt was aborted (by the coordinator or a peer): redo.</summary>
    Aborted = 1,
    /// <summary>A fault injected on purpose by <c>cluster.fault-injection</c>: redo.</summary>
    Injected = 2,
    /// <summary>A wait on a peer timed out: redo.</summary>
    Timeout = 3,
    /// <summary>The loss or gradient norm is not finite: redoing gives the same numbers, so the run stops.</summary>
    Diverged = 4,
    /// <summary>Plan or unit state is inconsistent (a unit missing or failing its checksum): the run stops.</summary>
    StateLost = 5,
}

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
    [property: Key(4)] long SystemUid,
    [property: Key(5)] string RunFingerprint) : IElasticMoEMessage
{
    /// <summary>
    /// A node that outlived its coordinator (a new incarnation of it): per device, the units it still holds
    /// in memory. A restarted coordinator adopts them when they agree with its journal, instead of going
    /// back to the last checkpoint. Empty for a fresh node.
    /// </summary>
    [Key(6)] public HeldUnits[] Held { get; init; } = [];

    /// <summary>The node's process id (0 from an older node): the shell's kill-worker drill refuses a node in the coordinator's own process.</summary>
    [Key(7)] public int ProcessId { get; init; }

    /// <summary>The node's <c>cluster.failure-domain</c> (a rack, a zone); null or empty = the node is a domain of its own.</summary>
    [Key(8)] public string? FailureDomain { get; init; }
}

/// <summary>
/// The units one worker of a re-attaching node holds: under plan <c>Epoch</c>, where it was
/// <c>Previous</c> (its identity in the incarnation that installed that plan), each unit with its applied
/// step (the last step it applied, -1 for none) and checksum. <c>LastEpoch</c> is the newest epoch any of
/// its attempts used: the next coordinator's plans must be newer, or the worker would take their messages
/// for stale ones.
/// </summary>
[MessagePackObject, Manifest("t.HeldUnits")]
public sealed record HeldUnits(
    [property: Key(0)] int Device,
    [property: Key(1)] WorkerInfo Previous,
    [property: Key(2)] int Epoch,
    [property: Key(3)] int LastEpoch,
    [property: Key(4)] string[] Units,
    [property: Key(5)] long[] AppliedSteps,
    [property: Key(6)] ulong[] Checksums);

/// <summary>Coordinator → node agent: registration accepted; the node's workers will receive a plan.</summary>
[MessagePackObject, Manifest("t.NodeAccepted")]
public sealed record NodeAccepted([property: Key(0)] string NodeAddress) : IElasticMoEMessage;

/// <summary>Coordinator → node agent: registration refused, with the reason (e.g. a different model config).</summary>
[MessagePackObject, Manifest("t.NodeRefused")]
public sealed record NodeRefused([property: Key(0)] string NodeAddress, [property: Key(1)] string Reason) : IElasticMoEMessage;

/// <summary>A unit to move during a re-plan: from the worker holding it to one that must.</summary>
[MessagePackObject, Manifest("t.UnitMove")]
public sealed record UnitMove([property: Key(0)] string Unit, [property: Key(1)] int FromWorker, [property: Key(2)] int ToRank);

/// <summary>
/// Coordinator → every device worker, in the plan or not: install plan <c>Epoch</c> before step
/// <c>StartStep</c>. Workers are listed in rank order (rank = replica·Pp + stage); each worker finds
/// itself by its identity (address, system uid, device), never by position. <c>Previous</c> lists the
/// workers of the plan before (ranks used by <c>Moves.FromWorker</c>); <c>Moves</c> are the units that
/// change hands (the pure <c>TransferPlanner</c>'s result), sent over the data plane and checksum-verified
/// on arrival. A worker then holds exactly the units this plan gives it, and nothing stale.
/// </summary>
[MessagePackObject, Manifest("t.InstallPlan")]
public sealed record InstallPlan(
    [property: Key(0)] int Epoch,
    [property: Key(1)] int Dp,
    [property: Key(2)] int Pp,
    [property: Key(3)] int[] StageStarts,
    [property: Key(4)] int[] StageEnds,
    [property: Key(5)] WorkerInfo[] Workers,
    [property: Key(6)] int[][] ExpertOwner,
    [property: Key(7)] long StartStep,
    [property: Key(8)] WorkerInfo[] Previous,
    [property: Key(9)] UnitMove[] Moves) : IElasticMoEMessage
{
    /// <summary>The plan's <see cref="Planning.TrainingPlan.Redundancy"/>: who mirrors what follows from it.</summary>
    [Key(10)] public int Redundancy { get; init; }

    /// <summary>A resumed run's first plan: the checkpoint every worker loads its units from; null otherwise.</summary>
    [Key(11)] public ResumeFrom? Resume { get; init; }

    /// <summary>The plan's <see cref="Planning.TrainingPlan.Copies"/> (replicated experts); null = one copy each, on its owner.</summary>
    [Key(12)] public int[][][]? ExpertCopies { get; init; }

    /// <summary>The plan's <see cref="Planning.TrainingPlan.Keepers"/> ([rank] → mirror keeper ranks); null = derived from the plan alone.</summary>
    [Key(13)] public int[][]? MirrorKeepers { get; init; }

    /// <summary>The plan's <see cref="Planning.TrainingPlan.Domains"/> (failure domain by rank); null = every node its own.</summary>
    [Key(14)] public string[]? Domains { get; init; }
}

/// <summary>
/// Device worker → coordinator: plan <c>Epoch</c> is installed: units received and verified, stage and
/// shards reconfigured in place (same actors). <c>Rank</c> is -1 for a worker the plan leaves idle.
/// Refs are this worker's long-lived actors; <c>ShardOrdinals</c>[i] is the MoE layer of <c>Shards</c>[i]
/// (shards with experts other workers call; private experts are the stage's).
/// </summary>
[MessagePackObject, Manifest("t.PlanInstalled")]
public sealed record PlanInstalled(
    [property: Key(0)] int Epoch,
    [property: Key(1)] WorkerInfo Worker,
    [property: Key(2)] int Rank,
    [property: Key(3)] Akka.Actor.IActorRef Self,
    [property: Key(4)] Akka.Actor.IActorRef Stage,
    [property: Key(5)] int[] ShardOrdinals,
    [property: Key(6)] Akka.Actor.IActorRef[] Shards,
    [property: Key(7)] long BytesReceived,
    [property: Key(8)] int UnitsReceived,
    [property: Key(9)] int UnitsHeld) : IElasticMoEMessage
{
    /// <summary>This worker's mirror keeper when the plan gives it mirrors to keep (then it takes part in steps and updates), else empty.</summary>
    [Key(10)] public Akka.Actor.IActorRef[] Mirrors { get; init; } = [];
}

/// <summary>
/// Device worker → coordinator: its stage or a shard failed more often than <c>cluster.worker-restarts</c>
/// allows in a minute (each failure re-created it in place); the worker leaves the plan, its node carries on.
/// </summary>
[MessagePackObject, Manifest("t.WorkerRetired")]
public sealed record WorkerRetired([property: Key(0)] WorkerInfo Worker, [property: Key(1)] string Reason) : IElasticMoEMessage;

/// <summary>Device worker → coordinator: the plan could not be installed (a unit failed to arrive or to verify).</summary>
[MessagePackObject, Manifest("t.PlanFailed")]
public sealed record PlanFailed([property: Key(0)] int Epoch, [property: Key(1)] WorkerInfo Worker, [property: Key(2)] string Reason) : IElasticMoEMessage;

/// <summary>Device worker → its stage and shards: take up plan epoch (rank -1: idle); report failures to Coordinator. Local only.</summary>
public sealed record Reconfigure(Planning.TrainingPlan Plan, int Rank, Akka.Actor.IActorRef Coordinator);

/// <summary>Stage or shard → its device worker: reconfigured for the epoch. Local only.</summary>
public sealed record Reconfigured(int Epoch, bool Active);

/// <summary>Coordinator → every worker of the plan: run forward and backward of your share of this step.</summary>
[MessagePackObject, Manifest("t.RunStep")]
public sealed record RunStep([property: Key(0)] Fence Fence) : IElasticMoEMessage;

/// <summary>
/// Coordinator → every device worker: abort this attempt. Every wait of the attempt is cancelled at once
/// (the worker cancels the attempt's token from its own thread, while its stage may be blocked); the
/// stage and shards answer <see cref="WorkerFailed"/> with <see cref="FailureKind.Aborted"/> and discard
/// partial gradients; the step is then redone as the next attempt.
/// </summary>
[MessagePackObject, Manifest("t.AbortAttempt")]
public sealed record AbortAttempt([property: Key(0)] Fence Fence, [property: Key(1)] string Reason) : IElasticMoEMessage;

/// <summary>
/// Σ g² per parameter name: what a stage or shard contributes to the global gradient norm, which the coordinator
/// adds in ordinal name order (<c>GradClip.CanonicalTotal</c>), whatever the layout.
/// </summary>
[MessagePackObject]
public sealed record NamedSums([property: Key(0)] string[] Names, [property: Key(1)] double[] Values)
{
    public static readonly NamedSums None = new([], []);

    public static NamedSums Of(IReadOnlyDictionary<string, double> sums)
        => new(sums.Keys.ToArray(), sums.Keys.Select(k => sums[k]).ToArray());

    [IgnoreMember] public IEnumerable<KeyValuePair<string, double>> Pairs => Names.Zip(Values, (n, v) => KeyValuePair.Create(n, v));
}

/// <summary>
/// Worker → coordinator: forward and backward are done and dense gradients are all-reduced.
/// LossSum is the sum of micro-batch losses (last stage only, else 0), for reading; the coordinator adds
/// <see cref="Losses"/> (micro-batch <see cref="FirstMicroBatch"/> + i at i) in micro-batch order instead.
/// GradSumSq is the squared L2 norm of every gradient this stage's backward completed: its (already
/// reduced) dense gradients, plus the experts private to it (see <c>TrainingPlan.ExpertsPrivateTo</c>),
/// whose shards therefore are not asked for a norm; <see cref="Norms"/> is the same per parameter, and is
/// what the coordinator adds up.
/// ExpertCounts: [moe layer ordinal of this stage's layers][expert] tokens routed by this worker.
/// </summary>
[MessagePackObject, Manifest("t.StepComputed")]
public sealed record StepComputed(
    [property: Key(0)] Fence Fence,
    [property: Key(1)] int Worker,
    [property: Key(2)] double LossSum,
    [property: Key(3)] int MicroBatches,
    [property: Key(4)] double GradSumSq,
    [property: Key(5)] int[] MoELayers,
    [property: Key(6)] long[][] ExpertCounts) : IElasticMoEMessage
{
    /// <summary>Seconds of this worker's forwards and backwards (its micro-batches, up to the dense all-reduce, which waits for the others).</summary>
    [Key(7)] public double ComputeSeconds { get; init; }

    /// <summary>The worker process's working set, bytes (what `workers` shows as memory; shared by the workers of one process).</summary>
    [Key(8)] public long WorkingSetBytes { get; init; }

    /// <summary>The worker process's intra-op thread budget (torch threads).</summary>
    [Key(9)] public int Threads { get; init; }

    /// <summary>Each micro-batch's loss (last stage only, else empty), micro-batch FirstMicroBatch + i at index i.</summary>
    [Key(10)] public double[] Losses { get; init; } = [];

    [Key(11)] public int FirstMicroBatch { get; init; }

    /// <summary>Σ g² of each parameter GradSumSq counts, by name.</summary>
    [Key(12)] public NamedSums Norms { get; init; } = NamedSums.None;
}

/// <summary>Coordinator → shard taking requests from other workers: every contribution of the step has arrived; report your gradient norm.</summary>
[MessagePackObject, Manifest("t.QueryExpertNorm")]
public sealed record QueryExpertNorm([property: Key(0)] Fence Fence) : IElasticMoEMessage;

[MessagePackObject, Manifest("t.ExpertNorm")]
public sealed record ExpertNorm([property: Key(0)] Fence Fence, [property: Key(1)] int Worker, [property: Key(2)] int MoEOrdinal, [property: Key(3)] double SumSq) : IElasticMoEMessage
{
    /// <summary>SumSq per parameter name: what the coordinator adds up (see <see cref="NamedSums"/>).</summary>
    [Key(4)] public NamedSums Norms { get; init; } = NamedSums.None;
}

/// <summary>
/// Coordinator → stages and shards: apply the optimizer with this rate and clip coefficient, and move the
/// router biases by the step's total loads ([moe layer ordinal][expert], summed over all replicas). Every
/// unit applies step <c>Fence.Step</c> at most once (its applied step says whether it has), so an update
/// interrupted half-way is finished by sending this again under the next attempt (rolled forward).
/// <c>ComputeAttempt</c> is the attempt whose gradients are applied: contributions of any other are void.
/// </summary>
[MessagePackObject, Manifest("t.ApplyUpdate")]
public sealed record ApplyUpdate(
    [property: Key(0)] Fence Fence,
    [property: Key(1)] double Lr,
    [property: Key(2)] double ClipScale,
    [property: Key(3)] long[][] LayerLoads,
    [property: Key(4)] bool Checksum,
    [property: Key(5)] int ComputeAttempt) : IElasticMoEMessage;

/// <summary>
/// Stage or shard → coordinator: the update is applied. <c>Applied</c> units did it now, <c>AlreadyApplied</c>
/// had done it before (a rolled-forward update). Checksum is of this stage's dense units when asked, else 0.
/// </summary>
[MessagePackObject, Manifest("t.UpdateApplied")]
public sealed record UpdateApplied(
    [property: Key(0)] Fence Fence,
    [property: Key(1)] int Worker,
    [property: Key(2)] ulong DenseChecksum,
    [property: Key(3)] int Applied,
    [property: Key(4)] int AlreadyApplied) : IElasticMoEMessage;

/// <summary>Coordinator → worker: compute validation loss on your share of the fixed validation batches.</summary>
[MessagePackObject, Manifest("t.RunEval")]
public sealed record RunEval([property: Key(0)] Fence Fence) : IElasticMoEMessage;

[MessagePackObject, Manifest("t.EvalComputed")]
public sealed record EvalComputed([property: Key(0)] Fence Fence, [property: Key(1)] int Worker, [property: Key(2)] double LossSum, [property: Key(3)] int Batches) : IElasticMoEMessage
{
    /// <summary>Each validation batch's loss (last stage only), batch FirstBatch + i at index i; added in batch order.</summary>
    [Key(4)] public double[] Losses { get; init; } = [];

    [Key(5)] public int FirstBatch { get; init; }
}

/// <summary>A stage or shard could not do what it was asked. The coordinator decides by <c>Kind</c>: redo the attempt or stop.</summary>
[MessagePackObject, Manifest("t.WorkerFailed")]
public sealed record WorkerFailed([property: Key(0)] Fence Fence, [property: Key(1)] int Worker, [property: Key(2)] FailureKind Kind, [property: Key(3)] string Reason) : IElasticMoEMessage;

/// <summary>
/// Stage → expert shard: tokens for your experts are on the data plane under DataTag, rows grouped by
/// expert (ascending) with Counts rows each. Reply on the data plane to ReplyEndpoint under ReplyTag.
/// With Train set, keep the graph for the matching <see cref="ExpertBackward"/>.
/// </summary>
[MessagePackObject, Manifest("t.ExpertForward")]
public sealed record ExpertForward(
    [property: Key(0)] Fence Fence,
    [property: Key(1)] int Requester,
    [property: Key(2)] int MicroBatch,
    [property: Key(3)] long[] Counts,
    [property: Key(4)] Int128 DataTag,
    [property: Key(5)] Int128 ReplyTag,
    [property: Key(6)] string ReplyEndpoint,
    [property: Key(7)] bool Train) : IElasticMoEMessage;

/// <summary>Stage → expert shard: output gradients under DataTag; reply with input gradients under ReplyTag.</summary>
[MessagePackObject, Manifest("t.ExpertBackward")]
public sealed record ExpertBackward(
    [property: Key(0)] Fence Fence,
    [property: Key(1)] int Requester,
    [property: Key(2)] int MicroBatch,
    [property: Key(3)] Int128 DataTag,
    [property: Key(4)] Int128 ReplyTag,
    [property: Key(5)] string ReplyEndpoint) : IElasticMoEMessage;

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
/// Anyone (the shell, a test) → coordinator: from the next step boundary, train on <c>Workers</c> workers
/// as DP = Workers / Pp × PP = <c>Pp</c>. Which workers is the planner's choice.
/// </summary>
[MessagePackObject, Manifest("t.RequestRelayout")]
public sealed record RequestRelayout([property: Key(0)] int Workers, [property: Key(1)] int Pp) : IElasticMoEMessage;

/// <summary>Anyone → coordinator: abort the attempt in flight (whatever its phase) and redo the step.</summary>
[MessagePackObject, Manifest("t.RequestAbort")]
public sealed record RequestAbort([property: Key(0)] string Reason) : IElasticMoEMessage;

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
