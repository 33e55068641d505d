using System.Numerics;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace ElasticMoE.Runtime.DataPlane;

/// <summary>
/// float32 &lt;-&gt; bfloat16 conversion, vectorised: these run over whole gradient buffers on the hot path.
/// </summary>
/// <remarks>
/// Rounding is to nearest, ties to even, like libtorch's <c>to(torch.bfloat16)</c>, so a value compressed
/// here and one converted by torch agree bit for bit. NaN stays a (quiet) NaN, infinities stay infinite;
/// a finite value too large for bf16 rounds to infinity, as in torch.
/// </remarks>
public static class BFloat16
{
    public static ushort FromSingle(float value)
    {
        var bits = BitConverter.SingleToUInt32Bits(value);
        if ((bits & 0x7FFF_FFFF) > 0x7F80_0000) return (ushort)((bits >> 16) | 0x0040);
        return (ushort)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
    }

    public static float ToSingle(ushort value) => BitConverter.UInt32BitsToSingle((uint)value << 16);

    /// <summary>Rounds each value to the nearest bfloat16, written as bfloat16 bits.</summary>
    public static void Compress(ReadOnlySpan<float> source, Span<ushort> destination)
    {
        if (destination.Length < source.Length) throw new ArgumentException("Destination too short.", nameof(destination));
        var bits = MemoryMarshal.Cast<float, uint>(source);
        ref var src = ref MemoryMarshal.GetReference(bits);
        ref var dst = ref MemoryMarshal.GetReference(destination);
        var n = bits.Length;
        var i = 0;
        if (Vector.IsHardwareAccelerated)
        {
            var step = Vector<ushort>.Count; // two uint vectors narrow into one ushort vector
            var half = Vector<uint>.Count;
            for (; i <= n - step; i += step)
            {
                var lo = RoundToBf16Bits(Vector.LoadUnsafe(ref src, (nuint)i));
                var hi = RoundToBf16Bits(Vector.LoadUnsafe(ref src, (nuint)(i + half)));
                Vector.Narrow(lo, hi).StoreUnsafe(ref dst, (nuint)i);
            }
        }
        for (; i < n; i++)
            Unsafe.Add(ref dst, i) = FromSingle(BitConverter.UInt32BitsToSingle(Unsafe.Add(ref src, i)));
    }

    /// <summary>Widens bfloat16 bits to float32 (exact).</summary>
    public static void Decompress(ReadOnlySpan<ushort> source, Span<float> destination)
    {
        if (destination.Length < source.Length) throw new ArgumentException("Destination too short.", nameof(destination));
        if (Unsafe.AreSame(
                ref Unsafe.As<ushort, byte>(ref MemoryMarshal.GetReference(source)),
                ref Unsafe.As<float, byte>(ref MemoryMarshal.GetReference(destination))) && source.Length > 0)
            throw new ArgumentException("Use DecompressInPlace for overlapping buffers.");
        Widen(ref MemoryMarshal.GetReference(source), ref Unsafe.As<float, uint>(ref MemoryMarshal.GetReference(destination)), source.Length);
    }

    /// <summary>
    /// Widens <paramref name="count"/> bfloat16 values stored in the upper half of
    /// <paramref name="buffer"/>[0 .. 4*count) into float32 over the whole range.
    /// </summary>
    /// <remarks>
    /// Lets the receiver read the compressed bytes straight into the buffer the consumer gets, with no second
    /// buffer: walking forward, each block is loaded before it is stored and the store never reaches bytes
    /// not yet read (element i is written to [4i, 4i+4) while unread input starts past 2*count + 2i).
    /// </remarks>
    public static void DecompressInPlace(Span<byte> buffer, int count)
    {
        if ((long)count * 4 > buffer.Length) throw new ArgumentException("Buffer shorter than 4 * count bytes.", nameof(buffer));
        ref var start = ref MemoryMarshal.GetReference(buffer);
        Widen(ref Unsafe.As<byte, ushort>(ref Unsafe.Add(ref start, 2 * count)), ref Unsafe.As<byte, uint>(ref start), count);
    }

    /// <summary>Replaces each value by its bfloat16 rounding, i.e. what a peer would read after compression.</summary>
    public static void RoundInPlace(Span<float> values)
    {
        var bits = MemoryMarshal.Cast<float, uint>(values);
        ref var p = ref MemoryMarshal.GetReference(bits);
        var n = bits.Length;
        var i = 0;
        if (Vector.IsHardwareAccelerated)
        {
            var step = Vector<uint>.Count;
            for (; i <= n - step; i += step)
                (RoundToBf16Bits(Vector.LoadUnsafe(ref p, (nuint)i)) << 16).StoreUnsafe(ref p, (nuint)i);
        }
        for (; i < n; i++)
            Unsafe.Add(ref p, i) = (uint)FromSingle(BitConverter.UInt32BitsToSingle(Unsafe.Add(ref p, i))) << 16;
    }

    // Works forward and loads each block before storing it, which DecompressInPlace relies on.
    private static void Widen(ref ushort src, ref uint dst, int n)
    {
        var i = 0;
        if (Vector.IsHardwareAccelerated)
        {
            var step = Vector<ushort>.Count;
            var half = Vector<uint>.Count;
            for (; i <= n - step; i += step)
            {
                Vector.Widen(Vector.LoadUnsafe(ref src, (nuint)i), out var lo, out var hi);
                (lo << 16).StoreUnsafe(ref dst, (nuint)i);
                (hi << 16).StoreUnsafe(ref dst, (nuint)(i + half));
            }
        }
        for (; i < n; i++)
            Unsafe.Add(ref dst, i) = (uint)Unsafe.Add(ref src, i) << 16;
    }

    // bf16 bits in the low half of each lane (upper half zero).
    private static Vector<uint> RoundToBf16Bits(Vector<uint> bits)
    {
        var rounded = (bits + new Vector<uint>(0x7FFF) + ((bits >> 16) & Vector<uint>.One)) >> 16;
        var isNaN = Vector.GreaterThan(bits & new Vector<uint>(0x7FFF_FFFF), new Vector<uint>(0x7F80_0000));
        var quietNaN = (bits >> 16) | new Vector<uint>(0x0040);
        return Vector.ConditionalSelect(isNaN, quietNaN, rounded);
    }
}
