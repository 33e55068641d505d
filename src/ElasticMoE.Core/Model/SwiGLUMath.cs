using System.Numerics;
using System.Runtime.CompilerServices;
using static TorchSharp.torch;

namespace ElasticMoE.Model;

/// <summary>
/// The elementwise halves of a SwiGLU chunk, one pass each over raw memory: forward a = silu(g) · u, backward dg
/// and du from the same h = [g | u]. As libtorch ops they were five calls forward and nine backward per chunk, each
/// a pass over the chunk, and the backward needed s = sigmoid(g) kept from the forward; now only h and a are kept.
/// With the chunk cut of <see cref="SwiGLUChunks.Cut"/>, the kernel's forward and backward got 9–12 % faster
/// (same run, 2-core VM); in a profile these passes are ~4 % of the kernel, the GEMMs ~65 %.
/// </summary>
/// <remarks>
/// Every element goes through the same vector code, the tail of a row included (padded into a full vector),
/// so an element's bits depend on its values alone, never on where a chunk or a row happens to end.
/// </remarks>
internal static class SwiGLUMath
{
    /// <summary>a[r, j] = silu(g) · u with g = h[r, j], u = h[r, H + j]; <paramref name="h"/> [rows, 2H], <paramref name="a"/> [rows, H].</summary>
    public static void Forward(Tensor h, Tensor a)
    {
        if (a.dtype == ScalarType.Float64) Forward<double>(h, a);
        else Forward<float>(h, a);
    }

    /// <summary>
    /// From h [rows, 2H] and da = ∂L/∂a [rows, H], writes dh [rows, 2H] = [∂L/∂g | ∂L/∂u]:
    /// ∂L/∂u = da · silu(g), ∂L/∂g = da · u · silu′(g) with silu′ = s (1 + g (1 − s)), s = sigmoid(g).
    /// </summary>
    public static void Backward(Tensor h, Tensor da, Tensor dh)
    {
        if (da.dtype == ScalarType.Float64) Backward<double>(h, da, dh);
        else Backward<float>(h, da, dh);
    }

    private static unsafe void Forward<T>(Tensor h, Tensor a) where T : unmanaged, IFloatingPointIeee754<T>
    {
        int hidden = checked((int)a.shape[1]);
        T* hs = Elements<T>(h, 2 * hidden, out long rows), y = Elements<T>(a, hidden, out _);
        Forward(hs, y, rows, hidden);
    }

    /// <summary>
    /// <see cref="Forward(Tensor, Tensor)"/> on raw memory: h = [g | u] [rows, 2H] into a [rows, H], both contiguous.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    internal static unsafe void Forward<T>(T* hs, T* y, long rows, int hidden) where T : unmanaged, IFloatingPointIeee754<T>
    {
        int n = Vector<T>.Count;
        int whole = hidden - hidden % n;
        T* tail = stackalloc T[2 * n];
        for (long r = 0; r < rows; r++, hs += 2 * hidden, y += hidden)
        {
            T* g = hs, u = hs + hidden;
            for (int j = 0; j < whole; j += n)
                Vector.Store(Activate(Vector.Load(g + j), Vector.Load(u + j)), y + j);
            if (whole == hidden) continue;
            // The row's tail through the same vector code, padded with zeros.
            int rest = hidden - whole;
            new Span<T>(tail, 2 * n).Clear();
            new Span<T>(g + whole, rest).CopyTo(new Span<T>(tail, n));
            new Span<T>(u + whole, rest).CopyTo(new Span<T>(tail + n, n));
            Vector.Store(Activate(Vector.Load(tail), Vector.Load(tail + n)), tail);
            new Span<T>(tail, rest).CopyTo(new Span<T>(y + whole, rest));
        }
    }

    private static unsafe void Backward<T>(Tensor h, Tensor da, Tensor dh) where T : unmanaged, IFloatingPointIeee754<T>
    {
        int hidden = checked((int)da.shape[1]);
        T* hs = Elements<T>(h, 2 * hidden, out long rows), d = Elements<T>(da, hidden, out _), dhs = Elements<T>(dh, 2 * hidden, out _);
        Backward(hs, d, dhs, rows, hidden);
    }

    /// <summary><see cref="Backward(Tensor, Tensor, Tensor)"/> on raw memory: h and dh [rows, 2H], da [rows, H], all contiguous.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    internal static unsafe void Backward<T>(T* hs, T* d, T* dhs, long rows, int hidden) where T : unmanaged, IFloatingPointIeee754<T>
    {
        int n = Vector<T>.Count;
        int whole = hidden - hidden % n;
        T* tail = stackalloc T[3 * n];
        for (long r = 0; r < rows; r++, hs += 2 * hidden, d += hidden, dhs += 2 * hidden)
        {
            T* g = hs, u = hs + hidden, dg = dhs, du = dhs + hidden;
            for (int j = 0; j < whole; j += n)
            {
                var (vg, vu) = Gradients(Vector.Load(g + j), Vector.Load(u + j), Vector.Load(d + j));
                Vector.Store(vg, dg + j);
                Vector.Store(vu, du + j);
            }
            if (whole == hidden) continue;
            int rest = hidden - whole;
            new Span<T>(tail, 3 * n).Clear();
            new Span<T>(g + whole, rest).CopyTo(new Span<T>(tail, n));
            new Span<T>(u + whole, rest).CopyTo(new Span<T>(tail + n, n));
            new Span<T>(d + whole, rest).CopyTo(new Span<T>(tail + 2 * n, n));
            var (tg, tu) = Gradients(Vector.Load(tail), Vector.Load(tail + n), Vector.Load(tail + 2 * n));
            Vector.Store(tg, tail);
            Vector.Store(tu, tail + n);
            new Span<T>(tail, rest).CopyTo(new Span<T>(dg + whole, rest));
            new Span<T>(tail + n, rest).CopyTo(new Span<T>(du + whole, rest));
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector<T> Sigmoid<T>(Vector<T> g) where T : unmanaged, IFloatingPointIeee754<T>
        => Vector<T>.One / (Vector<T>.One + Exp(-g));

    // float: ExpF below; double (the float64 gradient checks) Vector.Exp. The casts are free once the JIT specialises T.
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector<T> Exp<T>(Vector<T> x) where T : unmanaged, IFloatingPointIeee754<T>
    {
        if (typeof(T) == typeof(float)) { var e = ExpF(Unsafe.As<Vector<T>, Vector<float>>(ref x)); return Unsafe.As<Vector<float>, Vector<T>>(ref e); }
        if (typeof(T) == typeof(double)) { var e = Vector.Exp(Unsafe.As<Vector<T>, Vector<double>>(ref x)); return Unsafe.As<Vector<double>, Vector<T>>(ref e); }
        throw new NotSupportedException(typeof(T).Name);
    }

    /// <summary>
    /// e^x for floats, within 2 ulp: Cephes' expf (x = n ln 2 + r, |r| ≤ ln 2 / 2, e^r by a degree-7 polynomial,
    /// 2^n from the exponent bits). With Vector.Exp a 256 × 96 chunk's forward pass took 34–40 µs
    /// here, with this one 21–30 µs.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static Vector<float> ExpF(Vector<float> x)
    {
        // Past ±88.38 e^x leaves float's range: clamp, and let inf and 0 come out of the exponent bits.
        var clamped = Vector.Min(Vector.Max(x, new Vector<float>(-87.33654f)), new Vector<float>(88.37626f));
        var n = Vector.Floor(Vector.FusedMultiplyAdd(clamped, new Vector<float>(1.44269504088896341f), new Vector<float>(0.5f)));
        var r = Vector.FusedMultiplyAdd(n, new Vector<float>(2.12194440e-4f), Vector.FusedMultiplyAdd(n, new Vector<float>(-0.693359375f), clamped));
        var p = new Vector<float>(1.9875691500E-4f);
        p = Vector.FusedMultiplyAdd(p, r, new Vector<float>(1.3981999507E-3f));
        p = Vector.FusedMultiplyAdd(p, r, new Vector<float>(8.3334519073E-3f));
        p = Vector.FusedMultiplyAdd(p, r, new Vector<float>(4.1665795894E-2f));
        p = Vector.FusedMultiplyAdd(p, r, new Vector<float>(1.6666665459E-1f));
        p = Vector.FusedMultiplyAdd(p, r, new Vector<float>(5.0000001201E-1f));
        p = Vector.FusedMultiplyAdd(p, r * r, r) + Vector<float>.One;
        var twoN = Vector.AsVectorSingle(Vector.ShiftLeft(Vector.ConvertToInt32(n) + new Vector<int>(127), 23));
        var result = p * twoN;
        // NaN in, NaN out (Min/Max would have turned it into a bound).
        return Vector.ConditionalSelect(Vector.Equals(x, x), result, x);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector<T> Activate<T>(Vector<T> g, Vector<T> u) where T : unmanaged, IFloatingPointIeee754<T> => g * Sigmoid(g) * u;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static (Vector<T> Dg, Vector<T> Du) Gradients<T>(Vector<T> g, Vector<T> u, Vector<T> da) where T : unmanaged, IFloatingPointIeee754<T>
    {
        var s = Sigmoid(g);
        var silu = g * s;
        var dsilu = Fma(silu, Vector<T>.One - s, s); // s (1 + g (1 − s)) = s + silu (1 − s)
        return (da * u * dsilu, da * silu);
    }

    // a · b + c rounded once; the casts are free once the JIT specialises T.
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector<T> Fma<T>(Vector<T> a, Vector<T> b, Vector<T> c) where T : unmanaged, IFloatingPointIeee754<T>
    {
        if (typeof(T) == typeof(float))
        {
            var r = Vector.FusedMultiplyAdd(Unsafe.As<Vector<T>, Vector<float>>(ref a), Unsafe.As<Vector<T>, Vector<float>>(ref b), Unsafe.As<Vector<T>, Vector<float>>(ref c));
            return Unsafe.As<Vector<float>, Vector<T>>(ref r);
        }
        var d = Vector.FusedMultiplyAdd(Unsafe.As<Vector<T>, Vector<double>>(ref a), Unsafe.As<Vector<T>, Vector<double>>(ref b), Unsafe.As<Vector<T>, Vector<double>>(ref c));
        return Unsafe.As<Vector<double>, Vector<T>>(ref d);
    }

    // The tensor's first element: it must be a contiguous CPU tensor [rows, width] of T.
    private static unsafe T* Elements<T>(Tensor t, int width, out long rows) where T : unmanaged
    {
        var dtype = typeof(T) == typeof(double) ? ScalarType.Float64 : ScalarType.Float32;
        if (t.dtype != dtype || t.device_type != TorchSharp.DeviceType.CPU || !t.is_contiguous() || t.dim() != 2 || t.shape[1] != width)
            throw new ArgumentException($"expected a contiguous {dtype} CPU tensor [rows, {width}], got {t.dtype} {t.device_type} [{string.Join(", ", t.shape)}]");
        rows = t.shape[0];
        return Native.TensorMemory.Pointer<T>(t);
    }
}
