using System.Buffers;
using System.Buffers.Binary;
using System.Globalization;
using System.Text.Json;
using TorchSharp;
using static TorchSharp.torch;

namespace ElasticMoE.State;

/// <summary>Raised when bytes are not a well-formed safetensors file; the message says what is wrong and where.</summary>
public sealed class SafetensorsFormatException(string message, Exception? inner = null) : FormatException(message, inner);

/// <summary>One tensor of a safetensors file, as its header describes it (record equality compares <see cref="Shape"/> by reference).</summary>
/// <param name="Name">The tensor's name (the header key).</param>
/// <param name="DType">The safetensors dtype code as written (<c>F32</c>, <c>BF16</c>, <c>I64</c>, …).</param>
/// <param name="ScalarType">The TorchSharp element type of that code.</param>
/// <param name="Shape">Dimensions; empty for a scalar.</param>
/// <param name="Begin">Start of its bytes, relative to the data section (the header's <c>data_offsets[0]</c>).</param>
/// <param name="End">End (exclusive) of its bytes, relative to the data section.</param>
public sealed record SafetensorsEntry(string Name, string DType, ScalarType ScalarType, IReadOnlyList<long> Shape, long Begin, long End)
{
    public long ByteLength => End - Begin;

    public long ElementCount
    {
        get
        {
            long n = 1;
            foreach (var d in Shape) n *= d;
            return n;
        }
    }
}

/// <summary>A tensor already copied to host memory, ready for <see cref="Safetensors.WriteRaw(Stream, IEnumerable{RawTensor}, IReadOnlyDictionary{string, string}?)"/>.</summary>
/// <param name="Name">The header key.</param>
/// <param name="DType">The safetensors dtype code (<c>F32</c>, <c>BF16</c>, …).</param>
/// <param name="Shape">Dimensions; empty for a scalar.</param>
/// <param name="Data">Dense row-major little-endian bytes: exactly dtype size × shape of them.</param>
public sealed record RawTensor(string Name, string DType, IReadOnlyList<long> Shape, ReadOnlyMemory<byte> Data);

/// <summary>
/// The safetensors format (8-byte little-endian header length N, N bytes of UTF-8 JSON, then the raw
/// little-endian tensor bytes). Chosen for units and checkpoints because it is a plain, documented
/// layout that any other tool (Python's safetensors, numpy with 20 lines of code) can read, so a
/// checkpoint never depends on this code base to be inspected, and because its header can be
/// validated completely before a single byte of tensor data is trusted.
/// </summary>
/// <remarks>
/// Writing is deterministic — tensors in ordinal name order, metadata keys sorted, the header padded
/// with spaces to a multiple of 8 so the data section starts aligned — so the same state always gives
/// the same bytes. Reading is strict: the entries must tile the data section exactly (no overlap, no
/// gap, no trailing bytes), every byte count must equal dtype size × shape, and unknown dtypes or
/// fields are errors, because a lenient reader would let a corrupted file load as wrong numbers.
/// A file is addressed as one <see cref="ReadOnlyMemory{T}"/>, so it is limited to 2 GiB.
/// </remarks>
public static class Safetensors
{
    /// <summary>The reserved header key of the string-to-string metadata.</summary>
    public const string MetadataKey = "__metadata__";

    /// <summary>The largest header accepted (as the reference implementation): a bound on what a corrupt length can make us parse.</summary>
    public const int MaxHeaderBytes = 100_000_000;

    private static readonly (string Code, ScalarType Type, int Size)[] DTypes =
    [
        ("F64", ScalarType.Float64, 8),
        ("F32", ScalarType.Float32, 4),
        ("F16", ScalarType.Float16, 2),
        ("BF16", ScalarType.BFloat16, 2),
        ("I64", ScalarType.Int64, 8),
        ("I32", ScalarType.Int32, 4),
        ("I16", ScalarType.Int16, 2),
        ("I8", ScalarType.Int8, 1),
        ("U8", ScalarType.Byte, 1),
        ("BOOL", ScalarType.Bool, 1),
    ];

    /// <summary>The safetensors code of a TorchSharp element type.</summary>
    /// <exception cref="NotSupportedException">A type safetensors (or this writer) has no code for.</exception>
    public static string DTypeOf(ScalarType type)
    {
        foreach (var d in DTypes)
            if (d.Type == type) return d.Code;
        throw new NotSupportedException($"safetensors has no dtype for {type}");
    }

    /// <summary>The TorchSharp element type and size of a safetensors code, or false for an unknown code.</summary>
    public static bool TryParseDType(string code, out ScalarType type, out int size)
    {
        foreach (var d in DTypes)
            if (string.Equals(d.Code, code, StringComparison.Ordinal))
            {
                (type, size) = (d.Type, d.Size);
                return true;
            }
        (type, size) = (default, 0);
        return false;
    }

    /// <summary>Serialises <paramref name="tensors"/> (any device, any layout) and <paramref name="metadata"/> into a new array.</summary>
    public static byte[] Write(IEnumerable<(string Name, Tensor Value)> tensors, IReadOnlyDictionary<string, string>? metadata = null)
        => ToArray(Plan(Planned(tensors), metadata));

    /// <summary>Serialises into <paramref name="destination"/>, streaming each tensor's bytes without a managed copy.</summary>
    public static void Write(Stream destination, IEnumerable<(string Name, Tensor Value)> tensors, IReadOnlyDictionary<string, string>? metadata = null)
    {
        ArgumentNullException.ThrowIfNull(destination);
        WriteLayout(destination, Plan(Planned(tensors), metadata));
    }

    /// <summary>
    /// Serialises tensors already copied to host memory (<see cref="RawTensor"/>) into
    /// <paramref name="destination"/>: the same bytes <c>Write</c> gives for the same values. This is
    /// what a checkpoint write uses: the step boundary only copies the tensors out, and the file is
    /// written from the copies (in the background, or in a process without libtorch) while the
    /// tensors themselves go on training.
    /// </summary>
    public static void WriteRaw(Stream destination, IEnumerable<RawTensor> tensors, IReadOnlyDictionary<string, string>? metadata = null)
    {
        ArgumentNullException.ThrowIfNull(destination);
        WriteLayout(destination, Plan(Planned(tensors), metadata));
    }

    /// <summary><see cref="WriteRaw(Stream, IEnumerable{RawTensor}, IReadOnlyDictionary{string, string}?)"/> into a new array.</summary>
    public static byte[] WriteRaw(IEnumerable<RawTensor> tensors, IReadOnlyDictionary<string, string>? metadata = null)
        => ToArray(Plan(Planned(tensors), metadata));

    private static byte[] ToArray(Layout layout)
    {
        var buffer = new byte[checked((int)layout.TotalBytes)];
        using (var stream = new MemoryStream(buffer, writable: true))
            WriteLayout(stream, layout);
        return buffer;
    }

    /// <summary>
    /// Parses and fully validates a file. The result refers to <paramref name="bytes"/> (no copy), so
    /// the caller must not change them while it is in use.
    /// </summary>
    /// <exception cref="SafetensorsFormatException">Anything malformed; nothing is partially read.</exception>
    public static SafetensorsFile Read(ReadOnlyMemory<byte> bytes)
    {
        RequireLittleEndian();
        var all = bytes.Span;
        if (all.Length < 8)
            throw new SafetensorsFormatException($"{all.Length} bytes is shorter than the 8-byte header length");
        ulong headerLength = BinaryPrimitives.ReadUInt64LittleEndian(all);
        if (headerLength > (ulong)(all.Length - 8))
            throw new SafetensorsFormatException($"header length {headerLength} runs past the end of the file ({all.Length} bytes)");
        if (headerLength > MaxHeaderBytes)
            throw new SafetensorsFormatException($"header length {headerLength} exceeds the limit of {MaxHeaderBytes} bytes");
        int n = (int)headerLength;
        var header = all.Slice(8, n);
        if (n == 0 || header[0] != (byte)'{')
            throw new SafetensorsFormatException("header is not a JSON object (it must start with '{')");
        // Checked here because JsonDocument only notices invalid UTF-8 when a string is read out of it.
        if (!System.Text.Unicode.Utf8.IsValid(header))
            throw new SafetensorsFormatException("header is not valid UTF-8");
        long dataOffset = 8L + n;
        long dataLength = all.Length - dataOffset;

        JsonDocument doc;
        try
        {
            doc = JsonDocument.Parse(bytes.Slice(8, n), new JsonDocumentOptions { MaxDepth = 8 });
        }
        catch (JsonException e)
        {
            throw new SafetensorsFormatException($"header is not valid JSON: {e.Message}", e);
        }

        using (doc)
        {
            if (doc.RootElement.ValueKind != JsonValueKind.Object)
                throw new SafetensorsFormatException("header is not a JSON object");
            var seen = new HashSet<string>(StringComparer.Ordinal);
            var entries = new List<SafetensorsEntry>();
            var metadata = new Dictionary<string, string>(StringComparer.Ordinal);
            foreach (var prop in doc.RootElement.EnumerateObject())
            {
                if (!seen.Add(prop.Name))
                    throw new SafetensorsFormatException($"header names '{prop.Name}' twice");
                if (prop.Name == MetadataKey) ReadMetadata(prop.Value, metadata);
                else entries.Add(ReadEntry(prop.Name, prop.Value, dataLength));
            }
            CheckTiling(entries, dataLength);
            entries.Sort((a, b) => string.CompareOrdinal(a.Name, b.Name));
            return new SafetensorsFile(bytes, dataOffset, entries, metadata);
        }
    }

    private static void ReadMetadata(JsonElement value, Dictionary<string, string> into)
    {
        if (value.ValueKind != JsonValueKind.Object)
            throw new SafetensorsFormatException($"'{MetadataKey}' is a {value.ValueKind}, not an object of strings");
        foreach (var m in value.EnumerateObject())
        {
            if (m.Value.ValueKind != JsonValueKind.String)
                throw new SafetensorsFormatException($"metadata '{m.Name}' is a {m.Value.ValueKind}, not a string");
            if (!into.TryAdd(m.Name, m.Value.GetString()!))
                throw new SafetensorsFormatException($"metadata names '{m.Name}' twice");
        }
    }

    private static SafetensorsEntry ReadEntry(string name, JsonElement value, long dataLength)
    {
        SafetensorsFormatException Bad(string what) => new($"tensor '{name}': {what}");
        if (value.ValueKind != JsonValueKind.Object) throw Bad($"entry is a {value.ValueKind}, not an object");
        string? dtype = null;
        long[]? shape = null, offsets = null;
        foreach (var f in value.EnumerateObject())
        {
            switch (f.Name)
            {
                case "dtype" when dtype is null:
                    dtype = f.Value.ValueKind == JsonValueKind.String ? f.Value.GetString()! : throw Bad("dtype is not a string");
                    break;
                case "shape" when shape is null:
                    shape = ReadIntegers(f.Value, "shape", Bad);
                    break;
                case "data_offsets" when offsets is null:
                    offsets = ReadIntegers(f.Value, "data_offsets", Bad);
                    break;
                case "dtype" or "shape" or "data_offsets":
                    throw Bad($"field '{f.Name}' given twice");
                default:
                    throw Bad($"unknown field '{f.Name}'");
            }
        }
        if (dtype is null) throw Bad("no dtype");
        if (shape is null) throw Bad("no shape");
        if (offsets is null) throw Bad("no data_offsets");
        if (!TryParseDType(dtype, out var type, out var size)) throw Bad($"unknown dtype '{dtype}'");
        if (offsets.Length != 2) throw Bad($"data_offsets has {offsets.Length} values, not 2");
        var (begin, end) = (offsets[0], offsets[1]);
        if (begin > end) throw Bad($"data_offsets [{begin}, {end}] end before they begin");
        if (end > dataLength) throw Bad($"data_offsets [{begin}, {end}] run past the data section ({dataLength} bytes)");
        long expected;
        try
        {
            long count = 1;
            foreach (var d in shape) count = checked(count * d);
            expected = checked(count * size);
        }
        catch (OverflowException)
        {
            throw Bad($"shape [{string.Join(", ", shape)}] is too large");
        }
        if (end - begin != expected)
            throw Bad($"data_offsets [{begin}, {end}] hold {end - begin} bytes but {dtype} [{string.Join(", ", shape)}] needs {expected}");
        return new SafetensorsEntry(name, dtype, type, shape, begin, end);
    }

    private static long[] ReadIntegers(JsonElement value, string field, Func<string, SafetensorsFormatException> bad)
    {
        if (value.ValueKind != JsonValueKind.Array) throw bad($"{field} is not an array");
        var result = new long[value.GetArrayLength()];
        int i = 0;
        foreach (var item in value.EnumerateArray())
        {
            if (item.ValueKind != JsonValueKind.Number || !item.TryGetInt64(out var v) || v < 0)
                throw bad($"{field} holds '{item.GetRawText()}', not a non-negative integer");
            result[i++] = v;
        }
        return result;
    }

    // The entries must cover [0, dataLength) exactly once: an overlap would let two tensors share bytes,
    // a gap or trailing bytes would mean the header and the data disagree (a truncated or spliced file).
    private static void CheckTiling(List<SafetensorsEntry> entries, long dataLength)
    {
        var byOffset = entries.OrderBy(e => e.Begin).ThenBy(e => e.End).ToList();
        long position = 0;
        SafetensorsEntry? previous = null;
        foreach (var e in byOffset)
        {
            if (e.Begin < position)
                throw new SafetensorsFormatException($"tensor '{e.Name}' [{e.Begin}, {e.End}] overlaps tensor '{previous!.Name}' [{previous.Begin}, {previous.End}]");
            if (e.Begin > position)
                throw new SafetensorsFormatException($"bytes [{position}, {e.Begin}) before tensor '{e.Name}' belong to no tensor");
            position = e.End;
            previous = e;
        }
        if (position != dataLength)
            throw new SafetensorsFormatException($"data section has {dataLength} bytes but the tensors cover {position}");
    }

    /// <summary>One tensor to write: its header fields and how to stream its bytes.</summary>
    private sealed record PlannedTensor(string Name, string DType, IReadOnlyList<long> Shape, long ByteLength, Action<Stream> WriteBytes);

    private sealed record Layout(byte[] Header, List<PlannedTensor> Tensors, long TotalBytes);

    private static IEnumerable<PlannedTensor> Planned(IEnumerable<(string Name, Tensor Value)> tensors)
    {
        ArgumentNullException.ThrowIfNull(tensors);
        return tensors.Select(t =>
        {
            ArgumentNullException.ThrowIfNull(t.Value, nameof(tensors));
            var value = t.Value;
            return new PlannedTensor(t.Name, DTypeOf(value.dtype), value.shape, value.numel() * value.ElementSize,
                s => VisitBytes(value, chunk => s.Write(chunk)));
        });
    }

    private static IEnumerable<PlannedTensor> Planned(IEnumerable<RawTensor> tensors)
    {
        ArgumentNullException.ThrowIfNull(tensors);
        return tensors.Select(t =>
        {
            ArgumentNullException.ThrowIfNull(t, nameof(tensors));
            if (!TryParseDType(t.DType, out _, out var size)) throw new ArgumentException($"tensor '{t.Name}': unknown dtype '{t.DType}'", nameof(tensors));
            long count = 1;
            foreach (var d in t.Shape) count = checked(count * d);
            if (count * size != t.Data.Length)
                throw new ArgumentException($"tensor '{t.Name}' has {t.Data.Length} bytes but {t.DType} [{string.Join(", ", t.Shape)}] needs {count * size}", nameof(tensors));
            var data = t.Data;
            return new PlannedTensor(t.Name, t.DType, t.Shape, data.Length, s => s.Write(data.Span));
        });
    }

    private static Layout Plan(IEnumerable<PlannedTensor> tensors, IReadOnlyDictionary<string, string>? metadata)
    {
        RequireLittleEndian();
        var list = new List<PlannedTensor>();
        var names = new HashSet<string>(StringComparer.Ordinal);
        foreach (var t in tensors)
        {
            if (string.IsNullOrEmpty(t.Name)) throw new ArgumentException("a tensor name is empty", nameof(tensors));
            if (t.Name == MetadataKey) throw new ArgumentException($"'{MetadataKey}' is reserved for the metadata", nameof(tensors));
            if (!names.Add(t.Name)) throw new ArgumentException($"tensor '{t.Name}' is given twice", nameof(tensors));
            list.Add(t);
        }
        list.Sort((a, b) => string.CompareOrdinal(a.Name, b.Name));

        var json = new ArrayBufferWriter<byte>();
        using (var w = new Utf8JsonWriter(json))
        {
            w.WriteStartObject();
            if (metadata is { Count: > 0 })
            {
                w.WriteStartObject(MetadataKey);
                foreach (var (k, v) in metadata.OrderBy(kv => kv.Key, StringComparer.Ordinal))
                    w.WriteString(k, v ?? throw new ArgumentException($"metadata '{k}' is null", nameof(metadata)));
                w.WriteEndObject();
            }
            long offset = 0;
            foreach (var t in list)
            {
                w.WriteStartObject(t.Name);
                w.WriteString("dtype", t.DType);
                w.WriteStartArray("shape");
                foreach (var d in t.Shape) w.WriteNumberValue(d);
                w.WriteEndArray();
                w.WriteStartArray("data_offsets");
                w.WriteNumberValue(offset);
                w.WriteNumberValue(offset + t.ByteLength);
                w.WriteEndArray();
                w.WriteEndObject();
                offset += t.ByteLength;
            }
            w.WriteEndObject();
        }
        int padded = (json.WrittenCount + 7) / 8 * 8;
        var header = new byte[8 + padded];
        BinaryPrimitives.WriteUInt64LittleEndian(header, (ulong)padded);
        json.WrittenSpan.CopyTo(header.AsSpan(8));
        header.AsSpan(8 + json.WrittenCount).Fill((byte)' ');
        long total = header.Length + list.Sum(t => t.ByteLength);
        return new Layout(header, list, total);
    }

    private static void WriteLayout(Stream destination, Layout layout)
    {
        destination.Write(layout.Header);
        foreach (var t in layout.Tensors)
            t.WriteBytes(destination);
    }

    /// <summary>Receives a tensor's bytes, one chunk at a time (a span cannot exceed 2 GiB).</summary>
    internal delegate void ByteChunkVisitor(ReadOnlySpan<byte> chunk);

    /// <summary>
    /// Hands <paramref name="visitor"/> the tensor's dense row-major bytes straight from its storage
    /// when it is a contiguous CPU tensor, else from a temporary contiguous CPU copy.
    /// </summary>
    internal static void VisitBytes(Tensor tensor, ByteChunkVisitor visitor)
    {
        using var scope = NewDisposeScope();
        var dense = tensor.device_type == DeviceType.CPU ? tensor : tensor.cpu();
        if (!dense.is_contiguous()) dense = dense.contiguous();
        long elementSize = dense.ElementSize, count = dense.numel();
        if (count == 0) return;
        // bytes is a span over libtorch's storage (no copy), valid while the tensor lives; one span
        // holds at most 2 GiB, so a larger tensor goes as views of at most 1 GiB each.
        if (count * elementSize <= int.MaxValue)
            visitor(dense.bytes);
        else
        {
            long perChunk = (1L << 30) / elementSize;
            var flat = dense.reshape(-1);
            for (long start = 0; start < count; start += perChunk)
            {
                using var part = flat.narrow(0, start, Math.Min(perChunk, count - start));
                visitor(part.bytes);
            }
        }
        GC.KeepAlive(dense);
        GC.KeepAlive(tensor);
    }

    private static void RequireLittleEndian()
    {
        if (!BitConverter.IsLittleEndian)
            throw new PlatformNotSupportedException("safetensors data is little-endian; this reader and writer copy bytes as they are");
    }
}

/// <summary>
/// A parsed, validated safetensors file: its entries in name order and its metadata. Tensor bytes stay
/// in the caller's memory until <see cref="ToTensor"/> copies them out.
/// </summary>
public sealed class SafetensorsFile
{
    private readonly ReadOnlyMemory<byte> _bytes;
    private readonly long _dataOffset;
    private readonly Dictionary<string, SafetensorsEntry> _byName;

    internal SafetensorsFile(ReadOnlyMemory<byte> bytes, long dataOffset, List<SafetensorsEntry> entries, Dictionary<string, string> metadata)
    {
        _bytes = bytes;
        _dataOffset = dataOffset;
        Entries = entries;
        Metadata = metadata;
        _byName = entries.ToDictionary(e => e.Name, StringComparer.Ordinal);
    }

    /// <summary>Every tensor, in ordinal name order.</summary>
    public IReadOnlyList<SafetensorsEntry> Entries { get; }

    /// <summary>The <c>__metadata__</c> object; empty when the file has none.</summary>
    public IReadOnlyDictionary<string, string> Metadata { get; }

    /// <summary>Where the data section starts in the file (8 + header length).</summary>
    public long DataOffset => _dataOffset;

    public bool Contains(string name) => _byName.ContainsKey(name);

    public bool TryGetEntry(string name, [System.Diagnostics.CodeAnalysis.MaybeNullWhen(false)] out SafetensorsEntry entry)
        => _byName.TryGetValue(name, out entry);

    public SafetensorsEntry this[string name]
        => _byName.TryGetValue(name, out var e) ? e : throw new KeyNotFoundException($"no tensor '{name}' in this safetensors file");

    /// <summary>The raw little-endian bytes of a tensor (a view, no copy).</summary>
    public ReadOnlyMemory<byte> Bytes(string name) => Bytes(this[name]);

    public ReadOnlyMemory<byte> Bytes(SafetensorsEntry entry)
        => _bytes.Slice(checked((int)(_dataOffset + entry.Begin)), checked((int)entry.ByteLength));

    /// <summary>A new CPU tensor holding a copy of the named tensor; the caller owns it.</summary>
    public Tensor ToTensor(string name)
    {
        var entry = this[name];
        var tensor = empty(entry.Shape.ToArray(), entry.ScalarType, CPU);
        try
        {
            if (entry.ByteLength > 0) Bytes(entry).Span.CopyTo(tensor.bytes);
            return tensor;
        }
        catch
        {
            tensor.Dispose();
            throw;
        }
    }

    public override string ToString()
        => string.Create(CultureInfo.InvariantCulture, $"safetensors: {Entries.Count} tensors, {_bytes.Length - _dataOffset} data bytes, {Metadata.Count} metadata keys");
}
