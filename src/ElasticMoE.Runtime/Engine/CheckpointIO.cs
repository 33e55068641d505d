using ElasticMoE.Checkpointing;
using ElasticMoE.Runtime.Protocol;
using ElasticMoE.State;

namespace ElasticMoE.Runtime.Engine;

/// <summary>A worker's side of cluster checkpoints: host copies at the boundary, the shard written later, units loaded on resume.</summary>
public static class CheckpointIO
{
    /// <summary>The host copies of some units, taken now (the stall); <see cref="WriteShard"/> needs nothing else.</summary>
    public sealed record HostCopy(UnitId Unit, long AppliedStep, IReadOnlyList<RawTensor> Tensors);

    public static List<HostCopy> CopyToHost(WorkerContext ctx, IEnumerable<UnitId> units)
    {
        var copies = new List<HostCopy>();
        foreach (var id in units)
        {
            if (!ctx.Holds(id)) throw new InvalidOperationException($"asked to checkpoint unit {id}, which worker {ctx.Id} does not hold");
            var unit = ctx.Units[id];
            copies.Add(new HostCopy(id, unit.AppliedStep, unit.CopyToHost()));
        }
        return copies;
    }

    /// <summary>Writes the copies as one durable shard (temporary name, fsync, rename) and describes it for the manifest.</summary>
    public static CheckpointShardWritten WriteShard(WriteCheckpoint m, IReadOnlyList<HostCopy> copies)
    {
        var info = ShardFile.Write(m.Directory, m.Writer, m.Step, copies.Select(c => (ReadOnlyMemory<byte>)StateUnit.ExportRaw(c.Unit, c.AppliedStep, c.Tensors)));
        return new CheckpointShardWritten(m.Step, m.Writer, info.File, info.Bytes, info.Sha256, info.Units.Select(u => u.ToString()).ToArray(), null);
    }

    /// <summary>
    /// Loads <paramref name="units"/> from a committed checkpoint into this worker: the manifest must be the
    /// one the journal recorded (its SHA-256), each shard read must match the manifest's SHA-256 and size, and
    /// each unit its own checksum (<see cref="StateUnit.Import"/>), before the unit changes.
    /// </summary>
    public static int Load(WorkerContext ctx, ResumeFrom from, IEnumerable<UnitId> units)
    {
        var manifestBytes = File.ReadAllBytes(Path.Combine(from.Directory, CheckpointManifest.FileName));
        var sha = DurableFile.Sha256(manifestBytes);
        if (!string.Equals(sha, from.ManifestSha256, StringComparison.OrdinalIgnoreCase))
            throw new CheckpointCorruptException($"{from.Directory}/{CheckpointManifest.FileName}: SHA-256 {sha} is not the committed {from.ManifestSha256}");
        var manifest = CheckpointManifest.Parse(manifestBytes);
        int loaded = 0;
        foreach (var group in units.GroupBy(u => manifest.Units.TryGetValue(u, out var f) ? f
                     : throw new CheckpointCorruptException($"{from.Directory}: the manifest has no unit {u}")))
        {
            var entry = manifest.Files.Single(f => f.Name == group.Key);
            var path = Path.Combine(from.Directory, entry.Name);
            var bytes = File.ReadAllBytes(path);
            var fileSha = DurableFile.Sha256(bytes);
            if (bytes.Length != entry.Bytes || fileSha != entry.Sha256)
                throw new CheckpointCorruptException($"{path}: {bytes.Length} bytes, SHA-256 {fileSha}; the manifest says {entry.Bytes} bytes, {entry.Sha256}");
            var blobs = ShardFile.Split(bytes);
            foreach (var unit in group)
            {
                ctx.Units[unit].Import(blobs[unit]);
                ctx.Received(unit);
                loaded++;
            }
        }
        return loaded;
    }
}
