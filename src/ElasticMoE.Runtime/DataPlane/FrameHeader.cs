using System.Buffers.Binary;

namespace ElasticMoE.Runtime.DataPlane;

/// <summary>
/// The fixed 104-byte header in front of every data-plane payload.
/// </summary>
/// <remarks>
/// Layout, little-endian (version 2):
/// <code>
///  0  u32  magic "EMDP"
///  4  u16  version (2)
///  6  u8   element type (<see cref="ElementType"/>, libtorch codes)
///  7  u8   compression (<see cref="DataPlane.Compression"/>)
///  8  i32  source id (the sending node's id)
/// 12  u8   number of dimensions (0..8); bytes 13..15 reserved, zero
/// 16  i128 tag (see <see cref="CollectiveTags"/> and <c>StepTags</c>)
/// 32  i64  payload length in bytes, as on the wire
/// 40  8 x i64 shape; the unused trailing dimensions are zero
/// </code>
/// Fixed size so the reader needs one exact read and no length-of-header parsing, and every field the
/// receiver allocates from is cross-checked against another (shape x element size == length), so one
/// corrupted or hostile header is caught before any buffer is rented for it.
/// <para>
/// Version 1 (96 bytes) had a 64-bit tag, too narrow for 4,096 workers; version 2 widened it to 128 bits,
/// 8 more bytes per frame (under 1 % of a 1 kB frame, 0.001 % of a ring all-reduce's 1 MB chunk). The magic and
/// version come first in every version, so <see cref="TryParsePrefix"/> refuses a peer of another version
/// from its first 6 bytes, before waiting for a header whose length differs between versions.
/// </para>
/// </remarks>
public readonly record struct FrameHeader
{
    public const int Size = 104;
    public const uint Magic = 0x50444D45; // "EMDP" read as little-endian bytes
    public const ushort CurrentVersion = 2;
    /// <summary>Magic and version: the bytes every version starts with, enough to refuse a peer of another version.</summary>
    public const int PrefixSize = 6;
    private const int TagOffset = 16, LengthOffset = 32, ShapeOffset = 40;
    public const int MaxDimensions = 8;

    public required Int128 Tag { get; init; }
    public required int Source { get; init; }
    public required ElementType ElementType { get; init; }
    public Compression Compression { get; init; }
    public required long[] Shape { get; init; }
    /// <summary>Bytes that follow the header on the wire (compressed size when compressed).</summary>
    public required long PayloadLength { get; init; }

    /// <summary>Product of the shape; 1 for a scalar (no dimensions).</summary>
    public long ElementCount
    {
        get
        {
            long n = 1;
            foreach (var d in Shape) n *= d;
            return n;
        }
    }

    /// <summary>Bytes of the payload once decompressed, as handed to the consumer.</summary>
    public long DecodedLength => ElementCount * ElementTypes.SizeOf(ElementType);

    public void Write(Span<byte> destination)
    {
        if (destination.Length < Size) throw new ArgumentException("Destination shorter than a frame header.", nameof(destination));
        if (Shape.Length > MaxDimensions) throw new ArgumentException($"At most {MaxDimensions} dimensions fit a frame header.");
        var d = destination[..Size];
        d.Clear();
        BinaryPrimitives.WriteUInt32LittleEndian(d, Magic);
        BinaryPrimitives.WriteUInt16LittleEndian(d[4..], CurrentVersion);
        d[6] = (byte)ElementType;
        d[7] = (byte)Compression;
        BinaryPrimitives.WriteInt32LittleEndian(d[8..], Source);
        d[12] = (byte)Shape.Length;
        BinaryPrimitives.WriteInt128LittleEndian(d[TagOffset..], Tag);
        BinaryPrimitives.WriteInt64LittleEndian(d[LengthOffset..], PayloadLength);
        for (var i = 0; i < Shape.Length; i++)
            BinaryPrimitives.WriteInt64LittleEndian(d[(ShapeOffset + 8 * i)..], Shape[i]);
    }

    /// <summary>
    /// Parses and validates a header. On failure <paramref name="error"/> says what was wrong, for the log:
    /// the connection it came from can no longer be trusted to be at a frame boundary.
    /// </summary>
    public static bool TryParse(ReadOnlySpan<byte> source, long maxPayloadBytes, out FrameHeader header, out string? error)
    {
        header = default;
        if (source.Length < Size) { error = $"header is {source.Length} bytes, expected {Size}"; return false; }
        if (!TryParsePrefix(source, out error)) return false;
        var type = (ElementType)source[6];
        var elementSize = ElementTypes.SizeOf(type);
        if (elementSize == 0) { error = $"unknown element type code {source[6]}"; return false; }
        var compression = (Compression)source[7];
        if (compression is not (Compression.None or Compression.BFloat16)) { error = $"unknown compression code {source[7]}"; return false; }
        if (compression == Compression.BFloat16 && type != ElementType.Float32)
        { error = $"bfloat16 compression of {type} (only Float32 is compressed)"; return false; }
        int rank = source[12];
        if (rank > MaxDimensions) { error = $"{rank} dimensions (at most {MaxDimensions})"; return false; }
        if (source[13] != 0 || source[14] != 0 || source[15] != 0) { error = "reserved header bytes are not zero"; return false; }
        var length = BinaryPrimitives.ReadInt64LittleEndian(source[LengthOffset..]);
        if (length < 0) { error = $"negative payload length {length}"; return false; }
        if (length > maxPayloadBytes) { error = $"payload length {length} exceeds the maximum frame size {maxPayloadBytes}"; return false; }

        var shape = rank == 0 ? Array.Empty<long>() : new long[rank];
        long count = 1;
        for (var i = 0; i < MaxDimensions; i++)
        {
            var dim = BinaryPrimitives.ReadInt64LittleEndian(source[(ShapeOffset + 8 * i)..]);
            if (i >= rank)
            {
                if (dim != 0) { error = $"dimension slot {i} is {dim} beyond the declared {rank} dimensions"; return false; }
                continue;
            }
            if (dim < 0) { error = $"negative dimension {dim}"; return false; }
            shape[i] = dim;
            // Bounded by the length check below, so an absurd shape cannot overflow the product first.
            if (dim != 0 && count > maxPayloadBytes / dim) count = long.MaxValue;
            else count *= dim;
        }
        var wireElementSize = compression == Compression.BFloat16 ? 2 : elementSize;
        if (count == long.MaxValue || count * wireElementSize != length)
        {
            error = $"shape [{string.Join(", ", shape)}] of {type}{(compression == Compression.None ? "" : " as " + compression)} " +
                    $"does not match payload length {length}";
            return false;
        }

        header = new FrameHeader
        {
            Tag = BinaryPrimitives.ReadInt128LittleEndian(source[TagOffset..]),
            Source = BinaryPrimitives.ReadInt32LittleEndian(source[8..]),
            ElementType = type,
            Compression = compression,
            Shape = shape,
            PayloadLength = length,
        };
        error = null;
        return true;
    }

    /// <summary>
    /// Checks the magic and version, the first <see cref="PrefixSize"/> bytes of a header in every version.
    /// A peer of another version is refused with both versions named: it runs another build, and its frames
    /// (another header size, another tag layout) cannot be read.
    /// </summary>
    public static bool TryParsePrefix(ReadOnlySpan<byte> source, out string? error)
    {
        if (source.Length < PrefixSize) { error = $"header prefix is {source.Length} bytes, expected {PrefixSize}"; return false; }
        var magic = BinaryPrimitives.ReadUInt32LittleEndian(source);
        if (magic != Magic) { error = $"bad magic 0x{magic:X8}"; return false; }
        var version = BinaryPrimitives.ReadUInt16LittleEndian(source[4..]);
        if (version != CurrentVersion)
        {
            error = $"the peer speaks data-plane frame version {version}, this node speaks version {CurrentVersion} " +
                    "(run the same ElasticMoE build on every node)";
            return false;
        }
        error = null;
        return true;
    }
}
