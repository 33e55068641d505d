using System.Runtime.InteropServices;
using ElasticMoE.Runtime.DataPlane;

namespace ElasticMoE.Tests.DataPlane;

public sealed class BFloat16Tests
{
    // Independent scalar reference: round half to even on the upper 16 bits.
    private static ushort Reference(float f)
    {
        if (float.IsNaN(f)) return 0x7FC0;
        var bits = BitConverter.SingleToUInt32Bits(f);
        var upper = bits >> 16;
        var lower = bits & 0xFFFF;
        if (lower > 0x8000 || (lower == 0x8000 && (upper & 1) == 1)) upper++;
        return (ushort)upper;
    }

    private static float[] Samples(int n)
    {
        var rng = new Random(42);
        var values = new float[n];
        for (var i = 0; i < n; i++)
            values[i] = BitConverter.UInt32BitsToSingle((uint)rng.NextInt64(0, 1L << 32));
        // Ties both ways, extremes, signed zero, infinities, the largest finite (rounds to infinity).
        float[] special = [0f, -0f, 1f, -1f, float.PositiveInfinity, float.NegativeInfinity, float.MaxValue, float.Epsilon,
            BitConverter.UInt32BitsToSingle(0x3F808000), BitConverter.UInt32BitsToSingle(0x3F818000), BitConverter.UInt32BitsToSingle(0x3F80_8001)];
        special.CopyTo(values, 0);
        return values;
    }

    [Fact]
    public void Vectorised_compression_matches_the_scalar_reference_bit_for_bit()
    {
        var values = Samples(10_003); // not a multiple of any vector width: the tail path runs too
        var packed = new ushort[values.Length];
        BFloat16.Compress(values, packed);
        for (var i = 0; i < values.Length; i++)
        {
            if (float.IsNaN(values[i])) Assert.True(float.IsNaN(BFloat16.ToSingle(packed[i])));
            else Assert.True(Reference(values[i]) == packed[i], $"value {values[i]} (0x{BitConverter.SingleToUInt32Bits(values[i]):X8}): got 0x{packed[i]:X4}");
        }
    }

    [Fact]
    public void In_place_decompression_equals_out_of_place()
    {
        var values = Samples(4_099);
        var packed = new ushort[values.Length];
        BFloat16.Compress(values, packed);
        var expected = new float[values.Length];
        BFloat16.Decompress(packed, expected);

        var buffer = new byte[values.Length * 4];
        MemoryMarshal.AsBytes(packed.AsSpan()).CopyTo(buffer.AsSpan(values.Length * 2));
        BFloat16.DecompressInPlace(buffer, values.Length);
        var actual = MemoryMarshal.Cast<byte, float>(buffer);
        for (var i = 0; i < values.Length; i++)
            Assert.Equal(BitConverter.SingleToUInt32Bits(expected[i]), BitConverter.SingleToUInt32Bits(actual[i]));
    }

    [Fact]
    public void Round_in_place_is_compress_then_decompress_and_idempotent()
    {
        var values = Samples(1_001).Where(v => !float.IsNaN(v)).ToArray();
        var rounded = (float[])values.Clone();
        BFloat16.RoundInPlace(rounded);
        for (var i = 0; i < values.Length; i++)
            Assert.Equal(BFloat16.ToSingle(BFloat16.FromSingle(values[i])), rounded[i]);
        var again = (float[])rounded.Clone();
        BFloat16.RoundInPlace(again);
        Assert.Equal(rounded, again);
    }
}
