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
        // Both halves of the 128-bit tag non-zero, so a half lost or swapped shows.
        Tag = new Int128(0x0123_4567_89AB_CDEF, 0xFEDC_BA98_7654_3210),
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
        { "version", b => BinaryPrimitives.WriteUInt16LittleEndian(b.AsSpan(4), 1), "version 1, this node speaks version 2" },
        { "element type", b => b[6] = 99, "element type" },
        { "compression code", b => b[7] = 7, "compression" },
        { "compressed int", b => { b[6] = (byte)ElementType.Int32; b[7] = 1; }, "compression" },
        { "too many dims", b => b[12] = 9, "dimensions" },
        { "reserved byte", b => b[14] = 1, "reserved" },
        { "negative length", b => BinaryPrimitives.WriteInt64LittleEndian(b.AsSpan(32), -4), "negative" },
        { "oversize", b => BinaryPrimitives.WriteInt64LittleEndian(b.AsSpan(32), Max + 4), "exceeds the maximum frame size" },
        { "length vs shape", b => BinaryPrimitives.WriteInt64LittleEndian(b.AsSpan(32), 236), "does not match" },
        { "negative dim", b => BinaryPrimitives.WriteInt64LittleEndian(b.AsSpan(40), -3), "negative dimension" },
        { "stray dim", b => BinaryPrimitives.WriteInt64LittleEndian(b.AsSpan(40 + 8 * 5), 1), "beyond the declared" },
        { "overflowing shape", b => { BinaryPrimitives.WriteInt64LittleEndian(b.AsSpan(40), long.MaxValue / 2); BinaryPrimitives.WriteInt64LittleEndian(b.AsSpan(48), 4); }, "does not match" },
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

    [Fact]
    public void Version_2_is_104_bytes_with_the_tag_at_16_as_a_little_endian_int128()
    {
        var bytes = Write(Sample());
        Assert.Equal(104, FrameHeader.Size);
        Assert.Equal(2, BinaryPrimitives.ReadUInt16LittleEndian(bytes.AsSpan(4)));
        Assert.Equal(0xFEDC_BA98_7654_3210UL, BinaryPrimitives.ReadUInt64LittleEndian(bytes.AsSpan(16)));
        Assert.Equal(0x0123_4567_89AB_CDEFUL, BinaryPrimitives.ReadUInt64LittleEndian(bytes.AsSpan(24)));
        Assert.Equal(3 * 4 * 5 * 4, BinaryPrimitives.ReadInt64LittleEndian(bytes.AsSpan(32)));
        Assert.Equal(new long[] { 3, 4, 5, 0, 0, 0, 0, 0 },
            Enumerable.Range(0, 8).Select(i => BinaryPrimitives.ReadInt64LittleEndian(bytes.AsSpan(40 + 8 * i))));
    }

    [Fact]
    public void The_prefix_alone_refuses_another_version_naming_both()
    {
        var bytes = Write(Sample());
        Assert.True(FrameHeader.TryParsePrefix(bytes.AsSpan(0, FrameHeader.PrefixSize), out var none), none);
        BinaryPrimitives.WriteUInt16LittleEndian(bytes.AsSpan(4), 1);
        Assert.False(FrameHeader.TryParsePrefix(bytes.AsSpan(0, FrameHeader.PrefixSize), out var error));
        Assert.Contains("version 1", error);
        Assert.Contains("version 2", error);
    }
}
