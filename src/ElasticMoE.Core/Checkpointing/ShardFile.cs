using System.Globalization;
using ElasticMoE.State;

namespace ElasticMoE.Checkpointing;

/// <summary>Raised when a checkpoint's manifest, shard layout or commit log is not what this version writes.</summary>
public sealed class CheckpointFormatException(string message, Exception? inner = null) : FormatException(message, inner);

/// <summary>What a writer wrote: the shard's file name in the checkpoint directory, its size, SHA-256 and units.</summary>
public sealed record ShardInfo(string File, long Bytes, string Sha256, IReadOnlyList<UnitId> Units);

/// <summary>
/// One worker's part of a checkpoint: every unit it was asked to write, in ONE standard safetensors
/// file. Each tensor of unit U appears as <c>U/param/NAME</c>, <c>U/buffer/NAME</c>,
/// <c>U/adam_m/NAME</c> or <c>U/adam_v/NAME</c> (the unit blob's names behind the unit's name), and
/// each unit's blob metadata as <c>U/format</c>, <c>U/unit</c>, <c>U/applied_step</c> and
/// <c>U/checksum</c>; the file's own metadata says <c>format</c>, <c>step</c>, <c>writer</c> and
/// <c>units</c>.
/// </summary>
/// <remarks>
/// Why one file per writer rather than one per unit: a model has hundreds of expert units, and a file
/// per unit would cost an fsync and an entry in the manifest each. Why the unit blob's own names and
/// metadata: a unit read back out of a shard is byte for byte the blob <see cref="StateUnit.Export"/>
/// gave, so <see cref="StateUnit.Import"/> checks it with the same checksum, computed from the tensors
/// in memory before anything was written — an end-to-end check on top of the file's SHA-256.
/// </remarks>
public static class ShardFile
{
    /// <summary>The <c>format</c> metadata of a shard file; the version changes with the layout.</summary>
    public const string Format = "elasticmoe.shard.v1";

    /// <summary>The shard's file name for a writer; writer names are restricted so they are safe in any file system.</summary>
    public static string FileName(string writer)
    {
        ArgumentException.ThrowIfNullOrEmpty(writer);
        if (!writer.All(c => char.IsAsciiLetterOrDigit(c) || c is '-' or '_' or '.') || writer.StartsWith('.'))
            throw new ArgumentException($"writer name '{writer}' may hold only ASCII letters, digits, '-', '_' and '.' (not first)", nameof(writer));
        return $"shard-{writer}.safetensors";
    }

    /// <summary>
    /// Writes the shard of <paramref name="writer"/> for <paramref name="step"/> into
    /// <paramref name="checkpointDirectory"/>: from unit blobs (<see cref="StateUnit.Export"/> or
    /// <see cref="StateUnit.ExportRaw"/>), without a managed copy of their tensor bytes, atomically
    /// and durably (<see cref="DurableFile"/>).
    /// </summary>
    public static ShardInfo Write(string checkpointDirectory, string writer, long step, IEnumerable<ReadOnlyMemory<byte>> unitBlobs)
    {
        ArgumentNullException.ThrowIfNull(unitBlobs);
        var name = FileName(writer);
        var tensors = new List<RawTensor>();
        var metadata = new Dictionary<string, string>(StringComparer.Ordinal);
        var units = new List<UnitId>();
        foreach (var blob in unitBlobs)
        {
            var (unit, _) = StateUnit.VerifyBlob(blob);   // a bad blob is a bug of the caller: never write it
            var file = Safetensors.Read(blob);
            if (units.Contains(unit)) throw new ArgumentException($"unit {unit} is given twice", nameof(unitBlobs));
            units.Add(unit);
            foreach (var e in file.Entries) tensors.Add(new RawTensor($"{unit}/{e.Name}", e.DType, e.Shape, file.Bytes(e)));
            foreach (var (k, v) in file.Metadata) metadata[$"{unit}/{k}"] = v;
        }
        units.Sort();
        metadata["format"] = Format;
        metadata["step"] = step.ToString(CultureInfo.InvariantCulture);
        metadata["writer"] = writer;
        metadata["units"] = string.Join(',', units);
        var (bytes, sha) = DurableFile.Write(Path.Combine(checkpointDirectory, name), s => Safetensors.WriteRaw(s, tensors, metadata));
        return new ShardInfo(name, bytes, sha, units);
    }

    /// <summary>
    /// Cuts a shard back into its units' blobs, each exactly what <see cref="StateUnit.Export"/> gave.
    /// Only the layout is checked here (format, the unit list, every tensor and metadata key belonging
    /// to a listed unit); the blobs' checksums are checked by whoever imports or verifies them.
    /// </summary>
    /// <exception cref="SafetensorsFormatException">Not a valid safetensors file.</exception>
    /// <exception cref="CheckpointFormatException">Valid safetensors, but not a shard of this format.</exception>
    public static SortedDictionary<UnitId, byte[]> Split(ReadOnlyMemory<byte> shard)
    {
        var file = Safetensors.Read(shard);
        string Meta(string key) => file.Metadata.TryGetValue(key, out var v) ? v : throw new CheckpointFormatException($"shard has no '{key}' metadata");
        if (Meta("format") != Format) throw new CheckpointFormatException($"shard format is '{Meta("format")}', not '{Format}'");
        var listed = Meta("units");
        var units = new SortedDictionary<UnitId, (List<RawTensor> Tensors, Dictionary<string, string> Metadata)>();
        foreach (var text in listed.Length == 0 ? [] : listed.Split(','))
        {
            UnitId id;
            try { id = UnitId.Parse(text); }
            catch (FormatException e) { throw new CheckpointFormatException($"shard lists '{text}', which is no unit", e); }
            if (!units.TryAdd(id, ([], new Dictionary<string, string>(StringComparer.Ordinal))))
                throw new CheckpointFormatException($"shard lists unit {id} twice");
        }
        (List<RawTensor> Tensors, Dictionary<string, string> Metadata) Of(string key)
        {
            int slash = key.IndexOf('/');
            UnitId id = default;
            bool ok = false;
            if (slash > 0)
                try { id = UnitId.Parse(key[..slash]); ok = units.ContainsKey(id); }
                catch (FormatException) { }
            return ok ? units[id] : throw new CheckpointFormatException($"shard holds '{key}', which belongs to no unit it lists");
        }
        foreach (var e in file.Entries)
            Of(e.Name).Tensors.Add(new RawTensor(e.Name[(e.Name.IndexOf('/') + 1)..], e.DType, e.Shape, file.Bytes(e)));
        foreach (var (k, v) in file.Metadata)
            if (k is not ("format" or "step" or "writer" or "units")) Of(k).Metadata[k[(k.IndexOf('/') + 1)..]] = v;
        var blobs = new SortedDictionary<UnitId, byte[]>();
        foreach (var (id, (tensors, metadata)) in units)
            blobs[id] = Safetensors.WriteRaw(tensors, metadata);
        return blobs;
    }
}
