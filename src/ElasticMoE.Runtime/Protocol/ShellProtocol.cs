using MessagePack;

namespace ElasticMoE.Runtime.Protocol;

// The actor shell's protocol (`elasticmoe shell`): the shell's client ActorSystem → the ShellEndpoint at
// /user/shell of a coordinator-role node → (run queries and commands) the coordinator singleton. Same
// conventions as TrainingProtocol.cs: MessagePack records under IElasticMoEMessage with a stable manifest.
// Replies carry plain data only (strings, numbers, arrays of them), so `--json` prints them as they are.

/// <summary>A shell request the endpoint forwards to the coordinator (everything but <see cref="ShellClusterQuery"/>).</summary>
public interface IShellRunRequest : IElasticMoEMessage;

/// <summary>Shell → endpoint: the Akka cluster as the endpoint's node sees it. Answered by the endpoint itself.</summary>
[MessagePackObject, Manifest("s.ClusterQuery")]
public sealed record ShellClusterQuery : IElasticMoEMessage;

/// <summary>One cluster member: address, status (Up, Leaving, ...), roles, reachability from the endpoint's node, and
/// whether it hosts the coordinator singleton (the oldest coordinator-role member that is up).</summary>
[MessagePackObject]
public sealed record ShellMember(
    [property: Key(0)] string Address,
    [property: Key(1)] string Status,
    [property: Key(2)] string[] Roles,
    [property: Key(3)] bool Reachable,
    [property: Key(4)] bool Coordinator);

/// <summary>The cluster: the endpoint's node (<c>Self</c>), the leader, the endpoint node's uptime, every member.</summary>
[MessagePackObject, Manifest("s.Cluster")]
public sealed record ShellCluster(
    [property: Key(0)] string Self,
    [property: Key(1)] string Leader,
    [property: Key(2)] double UptimeSeconds,
    [property: Key(3)] ShellMember[] Members) : IElasticMoEMessage;

/// <summary>Shell → coordinator: the workers known to the run, with their place in the plan.</summary>
[MessagePackObject, Manifest("s.WorkersQuery")]
public sealed record ShellWorkersQuery : IShellRunRequest;

/// <summary>
/// One worker: its node, incarnation and device, data-plane endpoint, and in the plan in force its rank,
/// stage, data-parallel replica, block range, experts hosted and units held (rank -1: not in the plan).
/// </summary>
[MessagePackObject]
public sealed record ShellWorker(
    [property: Key(0)] string Node,
    [property: Key(1)] long SystemUid,
    [property: Key(2)] int Device,
    [property: Key(3)] string DataEndpoint,
    [property: Key(4)] int Rank,
    [property: Key(5)] int Stage,
    [property: Key(6)] int Replica,
    [property: Key(7)] string Blocks,
    [property: Key(8)] int Experts,
    [property: Key(9)] int Units,
    [property: Key(10)] bool Leaving)
{
    /// <summary>Its forwards and backwards of the last step it computed, seconds (null before its first).</summary>
    [Key(11)] public double? ComputeSeconds { get; init; }

    /// <summary>Its process's working set then, bytes (0 before its first step).</summary>
    [Key(12)] public long WorkingSetBytes { get; init; }

    /// <summary>Its process's thread budget (0 before its first step).</summary>
    [Key(13)] public int Threads { get; init; }

    /// <summary>The step those figures are of (-1: none yet).</summary>
    [Key(14)] public long StatsStep { get; init; } = -1;
}

[MessagePackObject, Manifest("s.Workers")]
public sealed record ShellWorkers([property: Key(0)] ShellWorker[] Workers, [property: Key(1)] double LastStepSeconds) : IElasticMoEMessage;

/// <summary>Shell → coordinator: the plan in force.</summary>
[MessagePackObject, Manifest("s.PlanQuery")]
public sealed record ShellPlanQuery : IShellRunRequest;

/// <summary>One pipeline stage: blocks [First, End) and the ranks that run it (one per data-parallel replica).</summary>
[MessagePackObject]
public sealed record ShellStage([property: Key(0)] int Stage, [property: Key(1)] int First, [property: Key(2)] int End, [property: Key(3)] int[] Ranks);

/// <summary>Where the experts of one MoE layer (block <c>Layer</c>) live: the owning rank of each expert, and its mirror's (-1: none).</summary>
[MessagePackObject]
public sealed record ShellExpertPlacement([property: Key(0)] int Layer, [property: Key(1)] int[] Owner, [property: Key(2)] int[] Mirror);

/// <summary>The plan in force (Epoch 0 and nothing else: no plan installed yet).</summary>
[MessagePackObject, Manifest("s.Plan")]
public sealed record ShellPlan(
    [property: Key(0)] int Epoch,
    [property: Key(1)] int Dp,
    [property: Key(2)] int Pp,
    [property: Key(3)] int WorldSize,
    [property: Key(4)] long AtStep,
    [property: Key(5)] int Redundancy,
    [property: Key(6)] ShellStage[] Stages,
    [property: Key(7)] string[] Ranks,
    [property: Key(8)] ShellExpertPlacement[] Experts) : IElasticMoEMessage;

/// <summary>Shell → coordinator: where the run is.</summary>
[MessagePackObject, Manifest("s.StatusQuery")]
public sealed record ShellTrainStatusQuery : IShellRunRequest;

/// <summary>
/// The run's progress: <c>Step</c> steps committed of <c>StepsTotal</c>; the last committed step's loss and
/// tokens/s (null before the first); the last validation loss and the step it followed; the ETA at the
/// mean step time so far; attempts redone; plans installed; the coordinator's phase ("paused" while held
/// by <c>train pause</c>).
/// </summary>
[MessagePackObject, Manifest("s.Status")]
public sealed record ShellTrainStatus(
    [property: Key(0)] long Step,
    [property: Key(1)] long StepsTotal,
    [property: Key(2)] double? Loss,
    [property: Key(3)] double? ValLoss,
    [property: Key(4)] long? ValStep,
    [property: Key(5)] double? TokensPerSecond,
    [property: Key(6)] double? EtaSeconds,
    [property: Key(7)] int RedoneAttempts,
    [property: Key(8)] int Plans,
    [property: Key(9)] string Phase,
    [property: Key(10)] bool Paused,
    [property: Key(11)] double ElapsedSeconds,
    [property: Key(12)] int Workers,
    [property: Key(13)] string? Stopping) : IElasticMoEMessage
{
    /// <summary>Null while every unit is on <c>cluster.redundancy</c> + 1 nodes; else what is short (a window of risk).</summary>
    [Key(14)] public string? BelowRedundancy { get; init; }
}

/// <summary>Shell → coordinator: per-expert token counts of the last committed step; <c>Layer</c> -1 = every MoE layer.</summary>
[MessagePackObject, Manifest("s.LoadsQuery")]
public sealed record ShellExpertLoadsQuery([property: Key(0)] int Layer) : IShellRunRequest;

/// <summary>Tokens routed to each expert of MoE block <c>Layer</c>, and the layer's max / mean load.</summary>
[MessagePackObject]
public sealed record ShellLayerLoads([property: Key(0)] int Layer, [property: Key(1)] long[] Tokens, [property: Key(2)] double MaxOverMean);

/// <summary>Expert loads of step <c>Step</c> (the last committed; -1 and no layers before the first).</summary>
[MessagePackObject, Manifest("s.Loads")]
public sealed record ShellExpertLoads([property: Key(0)] long Step, [property: Key(1)] ShellLayerLoads[] Layers) : IElasticMoEMessage;

/// <summary>Shell → coordinator: the committed checkpoints.</summary>
[MessagePackObject, Manifest("s.CheckpointsQuery")]
public sealed record ShellCheckpointsQuery : IShellRunRequest;

/// <summary>A committed checkpoint: the state after <c>Step</c> steps, its manifest's SHA-256, its files and bytes.</summary>
[MessagePackObject]
public sealed record ShellCheckpoint([property: Key(0)] long Step, [property: Key(1)] string ManifestSha256, [property: Key(2)] int Files, [property: Key(3)] long Bytes);

[MessagePackObject, Manifest("s.Checkpoints")]
public sealed record ShellCheckpoints([property: Key(0)] ShellCheckpoint[] Checkpoints, [property: Key(1)] string? RunDirectory) : IElasticMoEMessage;

/// <summary>Shell → coordinator: a control command ("pause", "resume", "stop", "checkpoint"), with the shell token.</summary>
[MessagePackObject, Manifest("s.Control")]
public sealed record ShellControl([property: Key(0)] string Action, [property: Key(1)] string Token) : IShellRunRequest;

/// <summary>Shell → coordinator: what a rebalance now would do (`rebalance now --dry-run`): nothing is applied, no token needed.</summary>
[MessagePackObject, Manifest("s.RebalanceQuery")]
public sealed record ShellRebalanceQuery : IShellRunRequest;

/// <summary>
/// A rebalance's prediction on the current load window: worker max/mean load before and after, and the expert copies it
/// would move; <c>Possible</c> false (with the reason in <c>Message</c>) when none can be planned now.
/// </summary>
[MessagePackObject, Manifest("s.RebalancePreview")]
public sealed record ShellRebalancePreview(
    [property: Key(0)] bool Possible,
    [property: Key(1)] string Message,
    [property: Key(2)] double MaxOverMeanBefore,
    [property: Key(3)] double MaxOverMeanAfter,
    [property: Key(4)] int CopiesMoved,
    [property: Key(5)] long WindowSteps) : IElasticMoEMessage;

/// <summary>Whether a control command was done (or refused, and why).</summary>
[MessagePackObject, Manifest("s.Ack")]
public sealed record ShellAck([property: Key(0)] bool Ok, [property: Key(1)] string Message) : IElasticMoEMessage;

/// <summary>Endpoint → shell: the request could not be answered (no coordinator here, or it did not answer in time).</summary>
[MessagePackObject, Manifest("s.Error")]
public sealed record ShellError([property: Key(0)] string Message) : IElasticMoEMessage;
