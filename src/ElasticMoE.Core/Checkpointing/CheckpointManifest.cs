using System.Text.Json;
using ElasticMoE.State;

namespace ElasticMoE.Checkpointing;

/// <summary>One file of a checkpoint as the manifest records it.</summary>
/// <param name="Name">File name inside the checkpoint directory.</param>
/// <param name="Bytes">Its exact size: a truncated or extended file is caught before it is even hashed.</param>
/// <param name="Sha256">Lower-case hex SHA-256 of its content.</param>
public sealed record CheckpointFile(string Name, long Bytes, string Sha256);

/// <summary>
/// <c>manifest.json</c> of a checkpoint directory: the step, the run it belongs to, the layout that
/// wrote it, every file with its size and SHA-256, and which file holds each unit. Written last,
/// atomically, after every shard is durable; its own SHA-256 goes into the commit log, so editing
/// the manifest (to make a damaged shard "match") is detected too.
/// </summary>
/// <param name="Step">Steps completed when the state was taken: training continues at this step.</param>
/// <param name="RunFingerprint">
/// <c>TrainingState.RunFingerprint</c> of the run: what decides its curve (model, training options,
/// seed, data), so a tool can tell which run a checkpoint belongs to.
/// </param>
/// <param name="Model">The model's shape (<c>TrainingState.Fingerprint</c>): states only load into the same architecture.</param>
/// <param name="Layout">Free-form facts about the layout that wrote it (mode, epoch, DP × PP, workers); informative, never needed to load.</param>
/// <param name="Files">Every file of the checkpoint except the manifest itself.</param>
/// <param name="Units">The file holding each unit; every unit exactly once, whatever the number of replicas that held it.</param>
public sealed record CheckpointManifest(
    long Step,
    string RunFingerprint,
    string Model,
    IReadOnlyDictionary<string, string> Layout,
    IReadOnlyList<CheckpointFile> Files,
    IReadOnlyDictionary<UnitId, string> Units)
{
    /// <summary>The <c>format</c> field; the version changes with the layout of checkpoints.</summary>
    public const string Format = "elasticmoe.checkpoint.v1";

    /// <summary>The manifest's file name in a checkpoint directory.</summary>
    public const string FileName = "manifest.json";

    /// <summary>Indented, deterministic JSON (keys in a fixed order, maps sorted), readable by people and any JSON tool.</summary>
    public byte[] ToJson()
    {
        using var buffer = new MemoryStream();
        using (var w = new Utf8JsonWriter(buffer, new JsonWriterOptions { Indented = true }))
        {
            w.WriteStartObject();
            w.WriteString("format", Format);
            w.WriteNumber("step", Step);
            w.WriteString("run_fingerprint", RunFingerprint);
            w.WriteString("model", Model);
            w.WriteStartObject("layout");
            foreach (var (k, v) in Layout.OrderBy(kv => kv.Key, StringComparer.Ordinal)) w.WriteString(k, v);
            w.WriteEndObject();
            w.WriteStartArray("files");
            foreach (var f in Files.OrderBy(f => f.Name, StringComparer.Ordinal))
            {
                w.WriteStartObject();
                w.WriteString("name", f.Name);
                w.WriteNumber("bytes", f.Bytes);
                w.WriteString("sha256", f.Sha256);
                w.WriteEndObject();
            }
            w.WriteEndArray();
            w.WriteStartObject("units");
            foreach (var (unit, file) in Units.OrderBy(kv => kv.Key)) w.WriteString(unit.ToString(), file);
            w.WriteEndObject();
            w.WriteEndObject();
        }
        buffer.WriteByte((byte)'\n');
        return buffer.ToArray();
    }

    /// <summary>Parses what <see cref="ToJson"/> writes, strictly: a missing or mistyped field is an error naming it.</summary>
    /// <exception cref="CheckpointFormatException">Not a manifest of this format.</exception>
    public static CheckpointManifest Parse(ReadOnlyMemory<byte> json)
    {
        try
        {
            using var doc = JsonDocument.Parse(json);
            var root = doc.RootElement;
            JsonElement Field(JsonElement o, string name, JsonValueKind kind)
                => o.ValueKind == JsonValueKind.Object && o.TryGetProperty(name, out var v) && v.ValueKind == kind
                    ? v : throw new CheckpointFormatException($"manifest has no {kind} '{name}'");
            var format = Field(root, "format", JsonValueKind.String).GetString();
            if (format != Format) throw new CheckpointFormatException($"manifest format is '{format}', not '{Format}'");
            var layout = Field(root, "layout", JsonValueKind.Object).EnumerateObject()
                .ToDictionary(p => p.Name, p => p.Value.GetString() ?? "", StringComparer.Ordinal);
            var files = Field(root, "files", JsonValueKind.Array).EnumerateArray()
                .Select(f => new CheckpointFile(Field(f, "name", JsonValueKind.String).GetString()!,
                    Field(f, "bytes", JsonValueKind.Number).GetInt64(), Field(f, "sha256", JsonValueKind.String).GetString()!))
                .ToList();
            var units = new SortedDictionary<UnitId, string>();
            foreach (var p in Field(root, "units", JsonValueKind.Object).EnumerateObject())
                if (!units.TryAdd(UnitId.Parse(p.Name), p.Value.GetString() ?? ""))
                    throw new CheckpointFormatException($"manifest names unit {p.Name} twice");
            foreach (var file in units.Values.Distinct())
                if (!files.Any(f => f.Name == file)) throw new CheckpointFormatException($"manifest maps units to '{file}', which it does not list");
            return new CheckpointManifest(Field(root, "step", JsonValueKind.Number).GetInt64(),
                Field(root, "run_fingerprint", JsonValueKind.String).GetString()!,
                Field(root, "model", JsonValueKind.String).GetString()!, layout, files, units);
        }
        catch (Exception e) when (e is JsonException or FormatException or InvalidOperationException && e is not CheckpointFormatException)
        {
            throw new CheckpointFormatException($"manifest is not valid: {e.Message}", e);
        }
    }
}
