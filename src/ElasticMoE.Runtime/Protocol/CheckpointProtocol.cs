using MessagePack;

namespace ElasticMoE.Runtime.Protocol;

// Checkpoints in a cluster run. The coordinator decides when and who writes what (one writer per unit);
// each device worker copies its units to host memory at the step boundary (the only stall) and writes its
// shard in the background; the coordinator writes the manifest once every shard is durable, and the
// journal event "checkpoint committed" is the commit point.

/// <summary>
/// Coordinator → device worker, at a step boundary (nothing of the next step has run): copy these units
/// to host memory now, answer <see cref="CheckpointCopied"/>, then write them as shard <c>Writer</c> of the
/// checkpoint in <c>Directory</c> and answer <see cref="CheckpointShardWritten"/>.
/// </summary>
[MessagePackObject, Manifest("t.WriteCheckpoint")]
public sealed record WriteCheckpoint(
    [property: Key(0)] long Step,
    [property: Key(1)] string Directory,
    [property: Key(2)] string Writer,
    [property: Key(3)] string[] Units) : IElasticMoEMessage;

/// <summary>Device worker → coordinator: the units of checkpoint <c>Step</c> are in host memory; training may go on.</summary>
[MessagePackObject, Manifest("t.CheckpointCopied")]
public sealed record CheckpointCopied([property: Key(0)] long Step, [property: Key(1)] string Writer, [property: Key(2)] string? Error) : IElasticMoEMessage;

/// <summary>Device worker → coordinator: the shard is durable (written, fsync'd, renamed), or why not.</summary>
[MessagePackObject, Manifest("t.CheckpointShardWritten")]
public sealed record CheckpointShardWritten(
    [property: Key(0)] long Step,
    [property: Key(1)] string Writer,
    [property: Key(2)] string File,
    [property: Key(3)] long Bytes,
    [property: Key(4)] string Sha256,
    [property: Key(5)] string[] Units,
    [property: Key(6)] string? Error) : IElasticMoEMessage;

/// <summary>
/// Where a resumed run's first plan takes its units from: a committed, verified checkpoint directory and
/// its manifest's SHA-256 (the journal's record of it). Each worker reads only the shards holding its units,
/// checks each file's SHA-256 against the manifest and each unit's checksum on import.
/// </summary>
[MessagePackObject]
public sealed record ResumeFrom([property: Key(0)] string Directory, [property: Key(1)] string ManifestSha256, [property: Key(2)] long Step);
