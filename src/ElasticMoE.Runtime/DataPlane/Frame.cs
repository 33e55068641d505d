using System.Runtime.InteropServices;

namespace ElasticMoE.Runtime.DataPlane;

/// <summary>
/// A received message: its header fields and its payload, decompressed, in a pooled buffer.
/// </summary>
/// <remarks>
/// Dispose it when done so the buffer goes back to the pool; multi-megabyte payloads would otherwise be a
/// fresh large-object-heap allocation per message, and gen-2 collections at the data rate. Reading a
/// disposed frame throws rather than returning a buffer that already holds someone else's tensor.
/// </remarks>
public sealed class Frame : IDisposable
{
    private byte[]? _buffer;
    private readonly int _length;
    private readonly FrameTally? _tally;

    internal Frame(Int128 tag, int source, ElementType elementType, long[] shape, byte[] buffer, int length, bool wasCompressed,
        FrameTally? tally = null)
    {
        _tally = tally;
        tally?.Created();
        Tag = tag;
        Source = source;
        ElementType = elementType;
        Shape = shape;
        _buffer = buffer;
        _length = length;
        WasCompressed = wasCompressed;
    }

    /// <summary>A frame over a copy of <paramref name="payload"/>, for a rank's message to itself in a collective.</summary>
    public static Frame Copy(Int128 tag, int source, ElementType elementType, long[] shape, ReadOnlySpan<byte> payload)
    {
        var buffer = BufferPool.Rent(payload.Length);
        payload.CopyTo(buffer);
        return new Frame(tag, source, elementType, shape, buffer, payload.Length, wasCompressed: false);
    }

    public Int128 Tag { get; }

    /// <summary>The sending node's <see cref="DataPlaneOptions.NodeId"/>.</summary>
    public int Source { get; }

    public ElementType ElementType { get; }

    public IReadOnlyList<long> Shape { get; }

    /// <summary>True when the payload crossed the wire as bfloat16 and was widened back to float32 here.</summary>
    public bool WasCompressed { get; }

    public int Length => _length;

    public long ElementCount => ElementTypes.SizeOf(ElementType) == 0 ? 0 : _length / ElementTypes.SizeOf(ElementType);

    public ReadOnlyMemory<byte> Payload => new(Buffer, 0, _length);

    public ReadOnlySpan<byte> Span => new(Buffer, 0, _length);

    // For in-place fix-ups by the data plane before the frame is handed out.
    internal Span<byte> MutableSpan => new(Buffer, 0, _length);

    /// <summary>The payload as float32 values; throws if it is of another type.</summary>
    public ReadOnlySpan<float> AsFloats()
    {
        if (ElementType != ElementType.Float32) throw new InvalidOperationException($"Frame {Tag} holds {ElementType}, not Float32.");
        return MemoryMarshal.Cast<byte, float>(Span);
    }

    public float[] ToFloatArray() => AsFloats().ToArray();

    public byte[] ToArray() => Span.ToArray();

    private byte[] Buffer => _buffer ?? throw new ObjectDisposedException(nameof(Frame), $"Frame {Tag} was disposed.");

    public void Dispose()
    {
        var buffer = Interlocked.Exchange(ref _buffer, null);
        if (buffer is null) return;
        BufferPool.Return(buffer);
        _tally?.Disposed();
    }

    public override string ToString() =>
        $"Frame(tag={Tag}, source={Source}, {ElementType}[{string.Join(",", Shape)}], {_length} bytes{(WasCompressed ? ", was bf16" : "")})";
}

/// <summary>
/// Counts a node's received frames that are not yet disposed (buffered, or handed out and still held), so
/// a forgotten <see cref="Frame.Dispose"/>, which costs a pooled buffer, shows as a number that never
/// returns to zero instead of as slowly rising memory.
/// </summary>
internal sealed class FrameTally
{
    private long _live;

    public long Live => Interlocked.Read(ref _live);

    public void Created() => Interlocked.Increment(ref _live);

    public void Disposed() => Interlocked.Decrement(ref _live);
}
