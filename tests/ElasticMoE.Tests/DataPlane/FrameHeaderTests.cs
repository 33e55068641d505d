using System.Buffers.Binary;
using ElasticMoE.Runtime.DataPlane;

namespace ElasticMoE.Tests.DataPlane;

public sealed class FrameHeaderTests
{
    private const long Max = 1 << 20;

    private static byte[] Write(FrameHeader header)
    {
        var bytes = new byte[FrameHeader.Size];
        header.Write(bytes);
        return bytes;
    }

    private static FrameHeader Sample() => new()
    {
        Tag = 0x1234_5678_9ABC_DEF0,
        Source = 7,
        ElementType = ElementType.Float32,
        Shape = [3, 4, 5],
        PayloadLength = 3 * 4 * 5 * 4,
    };

    [Fact]
    public void Round_trips_every_field()
    {
        var header = Sample() with { Compression = Compression.BFloat16, PayloadLength = 3 * 4 * 5 * 2 };
        Assert.True(FrameHeader.TryParse(Write(header), Max, out var parsed, out var error), error);
        Assert.Equal(header.Tag, parsed.Tag);
        Assert.Equal(7, parsed.Source);
        Assert.Equal(ElementType.Float32, parsed.ElementType);
        Assert.Equal(Compression.BFloat16, parsed.Compression);
        Assert.Equal(new long[] { 3, 4, 5 }, parsed.Shape);
        Assert.Equal(120, parsed.PayloadLength);
        Assert.Equal(240, parsed.DecodedLength);
    }

    [Fact]
    public void Scalar_and_empty_shapes_are_valid()
    {
        Assert.True(FrameHeader.TryParse(Write(Sample() with { Shape = [], PayloadLength = 4 }), Max, out var scalar, out _));
        Assert.Equal(1, scalar.ElementCount);
        Assert.True(FrameHeader.TryParse(Write(Sample() with { Shape = [0, 9], PayloadLength = 0 }), Max, out var empty, out _));
        Assert.Equal(0, empty.ElementCount);
    }

    public static TheoryData<string, Action<byte[]>, string> Corruptions => new()
    {
        { "magic", b => b[0] ^= 0xFF, "bad magic" },
        { "version", b => BinaryPrimitives.WriteUInt16LittleEndian(b.AsSpan(4), 2), "version" },
        { "element type", b => b[6] = 99, "element type" },
        { "compression code", b => b[7] = 7, "compression" },
        { "compressed int", b => { b[6] = (byte)ElementType.Int32; b[7] = 1; }, "compression" },
        { "too many dims", b => b[12] = 9, "dimensions" },
        { "reserved byte", b => b[14] = 1, "reserved" },
        { "negative length", b => BinaryPrimitives.WriteInt64LittleEndian(b.AsSpan(24), -4), "negative" },
        { "oversize", b => BinaryPrimitives.WriteInt64LittleEndian(b.AsSpan(24), Max + 4), "exceeds the maximum frame size" },
        { "length vs shape", b => BinaryPrimitives.WriteInt64LittleEndian(b.AsSpan(24), 236), "does not match" },
        { "negative dim", b => BinaryPrimitives.WriteInt64LittleEndian(b.AsSpan(32), -3), "negative dimension" },
        { "stray dim", b => BinaryPrimitives.WriteInt64LittleEndian(b.AsSpan(32 + 8 * 5), 1), "beyond the declared" },
        { "overflowing shape", b => { BinaryPrimitives.WriteInt64LittleEndian(b.AsSpan(32), long.MaxValue / 2); BinaryPrimitives.WriteInt64LittleEndian(b.AsSpan(40), 4); }, "does not match" },
    };

    [Theory]
    [MemberData(nameof(Corruptions))]
    public void Rejects_a_corrupted_header(string what, Action<byte[]> corrupt, string expected)
    {
        var bytes = Write(Sample());
        corrupt(bytes);
        Assert.False(FrameHeader.TryParse(bytes, Max, out _, out var error), what);
        Assert.Contains(expected, error, StringComparison.OrdinalIgnoreCase);
    }
}
