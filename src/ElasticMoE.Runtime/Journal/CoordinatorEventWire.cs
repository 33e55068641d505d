using MessagePack;

namespace ElasticMoE.Runtime.Journal;

// The journal's wire forms of the coordinator events and of the coordinator state (its snapshot). They
// are what is stored, so they are the format a journal written today must still be read in: keys are
// the format (append new ones, never renumber or reuse one), and a key added later reads as its type's
// default (0, null) from an older journal, which CoordinatorJournalCodec maps to what the field meant
// before it existed. A key written by a newer version is skipped by an older reader. The domain records
// (Coordination/, Core) carry no MessagePack attributes: CoordinatorJournalCodec maps both ways.

/// <summary>Stored form of <c>WorkerId</c>.</summary>
[MessagePackObject]
public sealed record WorkerIdWire(
    [property: Key(0)] string NodeAddress,
    [property: Key(1)] long SystemUid,
    [property: Key(2)] int Device);

/// <summary>Stored form of <c>WorkerSlot</c>.</summary>
[MessagePackObject]
public sealed record WorkerSlotWire(
    [property: Key(0)] string NodeAddress,
    [property: Key(1)] long SystemUid,
    [property: Key(2)] int Device,
    [property: Key(3)] string DataEndpoint);

/// <summary>Stored form of <c>TrainingPlan</c>; stages as parallel start/end arrays.</summary>
[MessagePackObject]
public sealed record TrainingPlanWire(
    [property: Key(0)] int Epoch,
    [property: Key(1)] int Dp,
    [property: Key(2)] int Pp,
    [property: Key(3)] int[] StageStarts,
    [property: Key(4)] int[] StageEnds,
    [property: Key(5)] WorkerSlotWire[] Workers,
    [property: Key(6)] int[][] ExpertOwner,
    [property: Key(7)] int Redundancy)
{
    /// <summary>Replicated experts (<c>TrainingPlan.Copies</c>); absent in journals written before replicas, and null = one copy each.</summary>
    [Key(8)] public int[][][]? Copies { get; init; }

    /// <summary>Mirror keepers by rank (<c>TrainingPlan.Keepers</c>); absent in journals written before r mirrors.</summary>
    [Key(9)] public int[][]? Keepers { get; init; }

    /// <summary>Failure domains by rank (<c>TrainingPlan.Domains</c>); absent = every node its own.</summary>
    [Key(10)] public string[]? Domains { get; init; }
}

/// <summary>Stored form of <c>StepResult</c>.</summary>
[MessagePackObject]
public sealed record StepResultWire(
    [property: Key(0)] long Step,
    [property: Key(1)] double Loss,
    [property: Key(2)] double Lr,
    [property: Key(3)] double GradNorm,
    [property: Key(4)] double MaxVio,
    [property: Key(5)] long[][] ExpertCounts,
    [property: Key(6)] long Tokens,
    [property: Key(7)] double Seconds);

/// <summary>Stored form of <c>CheckpointFile</c>.</summary>
[MessagePackObject]
public sealed record CheckpointFileWire(
    [property: Key(0)] string Path,
    [property: Key(1)] long Length,
    [property: Key(2)] string Sha256);

/// <summary>Stored form of <c>UnitTransfer</c>; the unit by its name (<c>UnitId.ToString</c>, read back by <c>UnitId.Parse</c>).</summary>
[MessagePackObject]
public sealed record UnitTransferWire(
    [property: Key(0)] string Unit,
    [property: Key(1)] WorkerIdWire From,
    [property: Key(2)] WorkerIdWire To);

[MessagePackObject]
public sealed record RunStartedWire(
    [property: Key(0)] string RunFingerprint,
    [property: Key(1)] long Seed,
    [property: Key(2)] long StartStep);

[MessagePackObject]
public sealed record NodeJoinedWire(
    [property: Key(0)] string Address,
    [property: Key(1)] long SystemUid,
    [property: Key(2)] WorkerSlotWire[] Workers);

[MessagePackObject]
public sealed record NodeRemovedWire(
    [property: Key(0)] string Address,
    [property: Key(1)] long SystemUid,
    [property: Key(2)] string Why);

[MessagePackObject]
public sealed record RunResumedWire([property: Key(0)] long Step);

[MessagePackObject]
public sealed record RolledBackWire([property: Key(0)] long FromStep, [property: Key(1)] long ToStep, [property: Key(2)] string[] LostUnits);

[MessagePackObject]
public sealed record CoordinatorRestartedWire([property: Key(0)] long AtStep);

[MessagePackObject]
public sealed record WorkersAdoptedWire([property: Key(0)] long NextStep, [property: Key(1)] TrainingPlanWire Plan);

[MessagePackObject]
public sealed record ExpertsRebalancedWire(
    [property: Key(0)] long Step,
    [property: Key(1)] double MaxOverMeanBefore,
    [property: Key(2)] double MaxOverMeanAfter,
    [property: Key(3)] int CopiesMoved,
    [property: Key(4)] bool Requested);

[MessagePackObject]
public sealed record ShellCommandIssuedWire([property: Key(0)] long Step, [property: Key(1)] string Command, [property: Key(2)] string[] Args);

[MessagePackObject]
public sealed record RunEndedWire([property: Key(0)] long NextStep, [property: Key(1)] string How);

[MessagePackObject]
public sealed record CheckpointRetiredWire([property: Key(0)] long Step, [property: Key(1)] string ManifestSha256);

[MessagePackObject]
public sealed record NodeLostWire(
    [property: Key(0)] string Address,
    [property: Key(1)] long SystemUid,
    [property: Key(2)] string Why,
    [property: Key(3)] long AtStep);

[MessagePackObject]
public sealed record PlanChangedWire(
    [property: Key(0)] TrainingPlanWire Plan,
    [property: Key(1)] long AtStep);

[MessagePackObject]
public sealed record StepCommittedWire(
    [property: Key(0)] StepResultWire Result,
    [property: Key(1)] int Attempts);

[MessagePackObject]
public sealed record CheckpointCommittedWire(
    [property: Key(0)] long Step,
    [property: Key(1)] string ManifestSha256,
    [property: Key(2)] CheckpointFileWire[] Files);

[MessagePackObject]
public sealed record ExpertsMovedWire(
    [property: Key(0)] int Epoch,
    [property: Key(1)] UnitTransferWire[] Moves);

/// <summary>Stored form of <c>CoordinatorState</c>: the snapshot.</summary>
[MessagePackObject]
public sealed record CoordinatorStateWire(
    [property: Key(0)] string? RunFingerprint,
    [property: Key(1)] long NextStep,
    [property: Key(2)] WorkerSlotWire[] Workers,
    [property: Key(3)] TrainingPlanWire? Plan,
    [property: Key(4)] StepResultWire[] Committed,
    [property: Key(5)] CheckpointCommittedWire[] Checkpoints)
{
    /// <summary>Added after v1: absent (null) in older snapshots, which were all of running runs.</summary>
    [Key(6)] public string? Ended { get; init; }

    /// <summary>Added with the shell's control commands: absent (null) in older snapshots, which had none.</summary>
    [Key(7)] public ShellCommandIssuedWire[]? ShellCommands { get; init; }
}
