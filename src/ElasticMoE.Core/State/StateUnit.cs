using System.Buffers.Binary;
using System.Globalization;
using System.IO.Hashing;
using System.Text;
using ElasticMoE.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace ElasticMoE.State;

/// <summary>Raised when a unit blob cannot be imported; the message names the unit and what is wrong.</summary>
public sealed class UnitFormatException(string message, Exception? inner = null) : Exception(message, inner);

/// <summary>
/// The complete training state of one unit held here: its tensors (references into the model), the
/// AdamW moments of its parameters, and the last step whose update it has applied. Everything that
/// moves between workers or into a checkpoint moves as a unit, so a unit carries all it needs to
/// continue training bit for bit somewhere else, and can prove with a checksum that it arrived whole.
/// </summary>
/// <remarks>
/// The tensors are not owned: they belong to the model, and the unit only names them. The moments
/// are owned (dispose the unit, or <see cref="Release"/> it, to free them). Moments of a parameter
/// appear at its first update with a gradient, exactly as in <see cref="Training.AdamW"/>, so a unit
/// and the single-process optimizer hold the same state at every step.
/// </remarks>
public sealed class StateUnit : IDisposable
{
    /// <summary>The <c>format</c> metadata of an exported unit; the version changes with the layout.</summary>
    public const string Format = "elasticmoe.unit.v1";

    private const string ParamPrefix = "param/", BufferPrefix = "buffer/", MomentMPrefix = "adam_m/", MomentVPrefix = "adam_v/";

    private readonly Dictionary<string, (Tensor M, Tensor V)> _moments = new(StringComparer.Ordinal);
    private readonly Dictionary<string, (Tensor Value, bool IsParameter)> _byName;

    /// <param name="id">The unit.</param>
    /// <param name="tensors">Its tensors, each named as in the model and belonging to <paramref name="id"/>; not owned.</param>
    public StateUnit(UnitId id, IEnumerable<(string Name, Tensor Value, bool IsParameter)> tensors)
    {
        ArgumentNullException.ThrowIfNull(tensors);
        Id = id;
        var list = tensors.OrderBy(t => t.Name, StringComparer.Ordinal).ToList();
        _byName = new Dictionary<string, (Tensor, bool)>(StringComparer.Ordinal);
        foreach (var (name, value, isParameter) in list)
        {
            ArgumentNullException.ThrowIfNull(value, nameof(tensors));
            if (UnitCatalog.OfTensor(name) != id) throw new ArgumentException($"tensor '{name}' belongs to unit {UnitCatalog.OfTensor(name)}, not {id}", nameof(tensors));
            if (!_byName.TryAdd(name, (value, isParameter))) throw new ArgumentException($"tensor '{name}' is given twice", nameof(tensors));
            Safetensors.DTypeOf(value.dtype); // fails now, not at the first export, for a dtype that cannot be exported
        }
        if (list.Count == 0) throw new ArgumentException($"unit {id} has no tensors", nameof(tensors));
        Tensors = list;
    }

    public UnitId Id { get; }

    /// <summary>The unit's tensors in ordinal name order: references into the model, not owned.</summary>
    public IReadOnlyList<(string Name, Tensor Value, bool IsParameter)> Tensors { get; }

    /// <summary>AdamW first and second moments by parameter name; a parameter has none until its first update with a gradient.</summary>
    public IReadOnlyDictionary<string, (Tensor M, Tensor V)> Moments => _moments;

    /// <summary>The moments, for the optimizer to create and update in place.</summary>
    internal Dictionary<string, (Tensor M, Tensor V)> MomentStore => _moments;

    /// <summary>The parameters (not buffers), as the optimizer takes them.</summary>
    public IEnumerable<(string Name, Tensor Param)> Parameters
        => Tensors.Where(t => t.IsParameter).Select(t => (t.Name, t.Value));

    /// <summary>
    /// The global step whose optimizer update this unit last applied; -1 before any. A unit moved in
    /// the middle of a step tells by this whether the step's update still has to be applied to it.
    /// </summary>
    public long AppliedStep { get; internal set; } = -1;

    /// <summary>
    /// Records that step <paramref name="step"/> was applied to a unit updated by something other than
    /// AdamW (the router bias moves by the step's loads). False, and nothing changes, when it already was:
    /// the same all-or-nothing rule as <see cref="Training.AdamW.StepUnit"/>.
    /// </summary>
    public bool TryMarkApplied(long step)
    {
        if (AppliedStep >= step) return false;
        AppliedStep = step;
        return true;
    }

    /// <summary>Bytes of the unit's state: its parameters and buffers plus its moments.</summary>
    public long ByteSize
    {
        get
        {
            long n = 0;
            foreach (var (_, t, _) in Tensors) n += t.numel() * t.ElementSize;
            foreach (var (m, v) in _moments.Values) n += m.numel() * m.ElementSize + v.numel() * v.ElementSize;
            return n;
        }
    }

    /// <summary>
    /// XxHash64 of the unit's id, applied step, and every tensor and moment (export name, dtype,
    /// shape, bytes) in export-name order. Equal checksums mean equal state, bit for bit, whatever
    /// node computed them; it is what an import checks a blob against.
    /// </summary>
    public ulong Checksum()
    {
        var hash = new UnitHasher(Id.ToString(), AppliedStep);
        foreach (var (name, t) in ExportEntries())
        {
            hash.AddEntry(name, Safetensors.DTypeOf(t.dtype), t.shape);
            Safetensors.VisitBytes(t, hash.AddBytes);
        }
        return hash.Finish();
    }

    /// <summary>
    /// The unit as safetensors: <c>param/NAME</c> or <c>buffer/NAME</c> for each tensor,
    /// <c>adam_m/NAME</c> and <c>adam_v/NAME</c> for each moment, with metadata <c>format</c>,
    /// <c>unit</c>, <c>applied_step</c> and <c>checksum</c> (16 lower-case hex digits).
    /// </summary>
    public byte[] Export()
        => Safetensors.Write(ExportEntries(), BlobMetadata(Id, AppliedStep, Checksum()));

    private static Dictionary<string, string> BlobMetadata(UnitId id, long appliedStep, ulong checksum) => new(StringComparer.Ordinal)
    {
        ["format"] = Format,
        ["unit"] = id.ToString(),
        ["applied_step"] = appliedStep.ToString(CultureInfo.InvariantCulture),
        ["checksum"] = Hex(checksum),
    };

    /// <summary>
    /// Copies everything <see cref="Export"/> would write — export name, dtype, shape and bytes of each
    /// tensor and moment — into host memory, and nothing more. This is the only part of a checkpoint
    /// that must happen at the step boundary: the copies stay valid while the model trains on, and
    /// <see cref="ExportRaw"/> hashes and lays them out later, on another thread or in another process.
    /// </summary>
    public IReadOnlyList<RawTensor> CopyToHost()
    {
        var copies = new List<RawTensor>();
        foreach (var (name, t) in ExportEntries())
        {
            var bytes = new byte[checked(t.numel() * t.ElementSize)];
            int at = 0;
            Safetensors.VisitBytes(t, chunk =>
            {
                chunk.CopyTo(bytes.AsSpan(at));
                at += chunk.Length;
            });
            copies.Add(new RawTensor(name, Safetensors.DTypeOf(t.dtype), t.shape, bytes));
        }
        return copies;
    }

    /// <summary>
    /// The blob <see cref="Export"/> gives, built from host copies (<see cref="CopyToHost"/>) of a unit
    /// with id <paramref name="id"/> at <paramref name="appliedStep"/>: the same bytes, checksum
    /// included, without touching a tensor. <see cref="Import"/> checks it like any other blob.
    /// </summary>
    public static byte[] ExportRaw(UnitId id, long appliedStep, IEnumerable<RawTensor> entries)
    {
        ArgumentNullException.ThrowIfNull(entries);
        var list = entries.OrderBy(e => e.Name, StringComparer.Ordinal).ToList();
        var hash = new UnitHasher(id.ToString(), appliedStep);
        foreach (var e in list)
        {
            hash.AddEntry(e.Name, e.DType, e.Shape);
            hash.AddBytes(e.Data.Span);
        }
        return Safetensors.WriteRaw(list, BlobMetadata(id, appliedStep, hash.Finish()));
    }

    /// <summary>
    /// Replaces this unit's state with an exported blob. Everything is validated first — format, unit,
    /// the exact set of names, dtypes, shapes, and the checksum recomputed over the blob's content —
    /// and only then is anything changed, so a rejected blob leaves the unit exactly as it was.
    /// Parameters lose their gradients: one computed against the old values must not be applied to
    /// the new ones.
    /// </summary>
    /// <exception cref="UnitFormatException">The blob is malformed, corrupted, or not this unit's.</exception>
    public void Import(ReadOnlyMemory<byte> bytes)
    {
        var (file, step) = Validate(bytes);

        // Stage every new tensor before touching the unit: an allocation failure then changes nothing.
        using var scope = NewDisposeScope();
        var copies = new List<(Tensor Target, Tensor Source)>(Tensors.Count);
        foreach (var (name, target, isParameter) in Tensors)
            copies.Add((target, OnDeviceOf(file.ToTensor((isParameter ? ParamPrefix : BufferPrefix) + name), target)));
        var moments = new Dictionary<string, (Tensor M, Tensor V)>(StringComparer.Ordinal);
        foreach (var e in file.Entries)
        {
            if (!e.Name.StartsWith(MomentMPrefix, StringComparison.Ordinal)) continue;
            var name = e.Name[MomentMPrefix.Length..];
            var param = _byName[name].Value;
            moments[name] = (OnDeviceOf(file.ToTensor(e.Name), param), OnDeviceOf(file.ToTensor(MomentVPrefix + name), param));
        }

        using (no_grad())
            foreach (var (target, source) in copies)
                target.copy_(source);
        foreach (var (_, t, isParameter) in Tensors)
            if (isParameter) t.grad = null;
        DisposeMoments();
        foreach (var (name, (m, v)) in moments)
            _moments[name] = (m.DetachFromDisposeScope(), v.DetachFromDisposeScope());
        AppliedStep = step;
    }

    /// <summary>
    /// The unit is no longer held here (it moved away). Frees the moments, drops the gradients and
    /// fills the values with NaN, so any accidental use of the stale copy — a forward through it, an
    /// export of it — shows at once instead of silently training on old numbers. Integer and bool
    /// tensors (none in this model) cannot hold NaN and are left as they are.
    /// </summary>
    public void Release()
    {
        DisposeMoments();
        using (no_grad())
            foreach (var (_, t, isParameter) in Tensors)
            {
                if (isParameter) t.grad = null;
                if (t.is_floating_point()) t.fill_(Scalars.Of(double.NaN));
            }
        AppliedStep = -1;
    }

    /// <summary>Frees the moments (the unit's only owned tensors); the model's tensors are untouched.</summary>
    public void Dispose() => DisposeMoments();

    public override string ToString()
        => string.Create(CultureInfo.InvariantCulture, $"{Id}: {Tensors.Count} tensors, {_moments.Count} moments, step {AppliedStep}, {ByteSize} bytes");

    private void DisposeMoments()
    {
        foreach (var (m, v) in _moments.Values)
        {
            m.Dispose();
            v.Dispose();
        }
        _moments.Clear();
    }

    /// <summary>Export name and tensor of everything the unit holds, in ordinal export-name order.</summary>
    private IEnumerable<(string Name, Tensor Value)> ExportEntries()
    {
        var entries = new List<(string Name, Tensor Value)>(Tensors.Count + 2 * _moments.Count);
        foreach (var (name, t, isParameter) in Tensors) entries.Add(((isParameter ? ParamPrefix : BufferPrefix) + name, t));
        foreach (var (name, (m, v)) in _moments)
        {
            entries.Add((MomentMPrefix + name, m));
            entries.Add((MomentVPrefix + name, v));
        }
        entries.Sort((a, b) => string.CompareOrdinal(a.Name, b.Name));
        return entries;
    }

    private static Tensor OnDeviceOf(Tensor cpu, Tensor like)
        => like.device_type == DeviceType.CPU ? cpu : cpu.to(like.device);

    private static string Hex(ulong checksum) => checksum.ToString("x16", CultureInfo.InvariantCulture);

    private UnitFormatException Fail(string what, Exception? inner = null) => new($"unit {Id}: {what}", inner);

    /// <summary>
    /// Every check of <see cref="Import"/> — format, unit, names, dtypes, shapes, checksum — without
    /// changing anything. A caller that imports several units checks them all first, so that a load
    /// is all or nothing: a bad blob among good ones must not leave the model half replaced.
    /// </summary>
    /// <exception cref="UnitFormatException">The blob is malformed, corrupted, or not this unit's.</exception>
    public void CheckImport(ReadOnlyMemory<byte> bytes) => Validate(bytes);

    /// <summary>
    /// Checks an exported blob without a unit to import it into: valid safetensors, the unit metadata,
    /// and the checksum recomputed over its content. Tools that hold no model (<c>elasticmoe
    /// checkpoints verify</c>) use it to prove, end to end, that the bytes on disk are the state the
    /// checksum was computed from in memory before anything was written.
    /// </summary>
    /// <returns>The unit the blob holds and its applied step.</returns>
    /// <exception cref="UnitFormatException">The blob is malformed or corrupted.</exception>
    public static (UnitId Unit, long AppliedStep) VerifyBlob(ReadOnlyMemory<byte> bytes)
    {
        static UnitFormatException Fail(string what, Exception? inner = null) => new($"unit blob: {what}", inner);
        var (file, unit, step, checksum) = ReadBlob(bytes, Fail);
        UnitId id;
        try
        {
            id = UnitId.Parse(unit);
        }
        catch (FormatException e)
        {
            throw Fail(e.Message, e);
        }
        CheckChecksum(file, unit, step, checksum, what => new UnitFormatException($"unit {unit}: {what}"));
        return (id, step);
    }

    /// <summary>Every check of <see cref="Import"/>, reading the blob only.</summary>
    private (SafetensorsFile File, long Step) Validate(ReadOnlyMemory<byte> bytes)
    {
        var (file, unit, step, checksum) = ReadBlob(bytes, (what, inner) => Fail(what, inner));
        if (unit != Id.ToString()) throw Fail($"the blob holds unit '{unit}'");

        var missing = new List<string>();
        foreach (var (name, target, isParameter) in Tensors)
        {
            var exportName = (isParameter ? ParamPrefix : BufferPrefix) + name;
            if (!file.TryGetEntry(exportName, out var e)) missing.Add(exportName);
            else CheckLike(e, target);
        }
        if (missing.Count > 0) throw Fail($"the blob lacks {string.Join(", ", missing)}");
        foreach (var e in file.Entries)
        {
            var (prefix, name) = Split(e.Name);
            switch (prefix)
            {
                case ParamPrefix or BufferPrefix:
                    if (!_byName.TryGetValue(name, out var t) || t.IsParameter != (prefix == ParamPrefix))
                        throw Fail($"the blob holds '{e.Name}', which this unit does not have");
                    break;
                case MomentMPrefix or MomentVPrefix:
                    if (!_byName.TryGetValue(name, out var p) || !p.IsParameter)
                        throw Fail($"the blob holds moment '{e.Name}' of no parameter of this unit");
                    var pair = (prefix == MomentMPrefix ? MomentVPrefix : MomentMPrefix) + name;
                    if (!file.Contains(pair)) throw Fail($"the blob holds '{e.Name}' without '{pair}'");
                    CheckLike(e, p.Value);
                    break;
                default:
                    throw Fail($"the blob holds '{e.Name}', which is no unit tensor");
            }
        }
        CheckChecksum(file, unit, step, checksum, what => Fail(what));
        return (file, step);
    }

    /// <summary>Parses the blob and its four metadata keys; the unit name is returned unchecked.</summary>
    private static (SafetensorsFile File, string Unit, long Step, string Checksum) ReadBlob(
        ReadOnlyMemory<byte> bytes, Func<string, Exception?, UnitFormatException> fail)
    {
        SafetensorsFile file;
        try
        {
            file = Safetensors.Read(bytes);
        }
        catch (SafetensorsFormatException e)
        {
            throw fail($"the blob is not valid safetensors ({e.Message})", e);
        }

        string Meta(string key) => file.Metadata.TryGetValue(key, out var v) ? v : throw fail($"the blob has no '{key}' metadata", null);
        var format = Meta("format");
        if (format != Format) throw fail($"the blob's format is '{format}', not '{Format}'", null);
        var unit = Meta("unit");
        var stepText = Meta("applied_step");
        // Canonical text only, so that no two different blobs carry the same step.
        if (!long.TryParse(stepText, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out var step) || step < -1
            || step.ToString(CultureInfo.InvariantCulture) != stepText)
            throw fail($"the blob's applied_step '{stepText}' is not a step", null);
        var checksum = Meta("checksum");
        if (file.Metadata.Count != 4)
            throw fail($"the blob has unexpected metadata: {string.Join(", ", file.Metadata.Keys.Except(["format", "unit", "applied_step", "checksum"]))}", null);
        return (file, unit, step, checksum);
    }

    private static void CheckChecksum(SafetensorsFile file, string unit, long step, string checksum, Func<string, UnitFormatException> fail)
    {
        var hash = new UnitHasher(unit, step);
        foreach (var e in file.Entries)
        {
            hash.AddEntry(e.Name, e.DType, e.Shape);
            hash.AddBytes(file.Bytes(e).Span);
        }
        var actual = Hex(hash.Finish());
        if (actual != checksum) throw fail($"checksum mismatch: the blob says {checksum}, its content gives {actual} (corrupted in transit or at rest)");
    }

    private void CheckLike(SafetensorsEntry e, Tensor like)
    {
        if (e.ScalarType != like.dtype) throw Fail($"'{e.Name}' is {e.DType}, not {Safetensors.DTypeOf(like.dtype)}");
        if (!e.Shape.SequenceEqual(like.shape))
            throw Fail($"'{e.Name}' has shape [{string.Join(", ", e.Shape)}], not [{string.Join(", ", like.shape)}]");
    }

    private static (string Prefix, string Name) Split(string exportName)
    {
        int slash = exportName.IndexOf('/');
        return slash < 0 ? ("", exportName) : (exportName[..(slash + 1)], exportName[(slash + 1)..]);
    }

    /// <summary>
    /// The checksum's byte stream: every field length-prefixed, so no two different states can feed
    /// the hash the same bytes. Shared by <see cref="Checksum"/> (from tensors) and import (from a blob).
    /// </summary>
    private sealed class UnitHasher
    {
        private readonly XxHash64 _hash = new();

        public UnitHasher(string unit, long appliedStep)
        {
            AddString(Format);
            AddString(unit);
            AddInt64(appliedStep);
        }

        public void AddEntry(string name, string dtype, IReadOnlyList<long> shape)
        {
            AddString(name);
            AddString(dtype);
            AddInt64(shape.Count);
            foreach (var d in shape) AddInt64(d);
        }

        /// <summary>The entry's bytes, in one or more chunks; the byte count is fixed by dtype and shape, so needs no prefix.</summary>
        public void AddBytes(ReadOnlySpan<byte> bytes) => _hash.Append(bytes);

        public ulong Finish() => _hash.GetCurrentHashAsUInt64();

        private void AddString(string s)
        {
            var bytes = Encoding.UTF8.GetBytes(s);
            AddInt64(bytes.Length);
            _hash.Append(bytes);
        }

        private void AddInt64(long v)
        {
            Span<byte> b = stackalloc byte[8];
            BinaryPrimitives.WriteInt64LittleEndian(b, v);
            _hash.Append(b);
        }
    }
}

/// <summary>Cuts a model into its state units.</summary>
public static class UnitBinding
{
    /// <summary>
    /// Every unit of <paramref name="model"/>, holding references to its parameters and router-bias
    /// buffers, by <see cref="UnitCatalog.OfTensor"/>. The result has exactly the units of
    /// <see cref="UnitCatalog.All"/>; anything else means the catalog and the model disagree and fails here.
    /// </summary>
    public static SortedDictionary<UnitId, StateUnit> Bind(MoETransformer model)
    {
        ArgumentNullException.ThrowIfNull(model);
        var groups = new SortedDictionary<UnitId, List<(string, Tensor, bool)>>();
        void Add(string name, Tensor t, bool isParameter)
        {
            var id = UnitCatalog.OfTensor(name);
            if (!groups.TryGetValue(id, out var list)) groups[id] = list = [];
            list.Add((name, t, isParameter));
        }
        foreach (var (name, p) in model.named_parameters()) Add(name, p, true);
        // Of the buffers only the router bias is training state: it changes every step (by the sign
        // rule) and cannot be recomputed. Any other buffer is derived from the config (the RoPE tables
        // are such a thing, though today they are not even registered), so every holder rebuilds it,
        // and moving it would cost bytes and make two sources of truth for one value.
        foreach (var (name, b) in model.named_buffers())
            if (name.EndsWith(".ffn.router.expert_bias", StringComparison.Ordinal)) Add(name, b, false);

        var expected = UnitCatalog.All(model.Options);
        if (!groups.Keys.SequenceEqual(expected))
            throw new InvalidOperationException(
                $"the model's tensors form units [{string.Join(", ", groups.Keys)}] but the catalog lists [{string.Join(", ", expected)}]");
        var units = new SortedDictionary<UnitId, StateUnit>();
        foreach (var (id, tensors) in groups) units[id] = new StateUnit(id, tensors);
        return units;
    }
}
