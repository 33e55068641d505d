using System.Numerics;
using static TorchSharp.torch;

namespace ElasticMoE.Training;

/// <summary>
/// AdamW's update and the gradient's sum of squares as one pass over each parameter's memory, tensors side by
/// side on libtorch's OpenMP team (<see cref="Native.OpenMPTeam"/>). For float32 CPU tensors; the callers keep
/// libtorch ops for anything else (a GPU, float64 tests).
/// </summary>
/// <remarks>
/// <para>Why: as libtorch ops the update is ten calls and eight passes over memory per parameter tensor, the sum of
/// squares four calls (a float64 copy, a product, a sum, an add). The default MoE has 106 parameter tensors (the
/// dense model of equal active width 31) and 1.9 times the dense model's parameters, so the optimizer cost it
/// 10.5 ms a step against 4.8 (2-core VM): a quarter of the MoE's whole deficit in tokens/s.</para>
/// <para>Bits: every element goes through the same sequence of IEEE float operations, in the vector body and in the
/// scalar tail alike (no fused multiply-add: .NET never contracts a * b + c), so an element's update depends on its
/// own values alone — not on the tensor it sits in, its position there, or the thread that ran it. A unit updated
/// by a shard, a mirror or the single-process loop comes out the same. A tensor's sum of squares is accumulated in
/// float64 in a fixed order; the sums of several tensors add up in the order given.</para>
/// </remarks>
internal static unsafe class AdamWKernel
{
    /// <summary>Whether <paramref name="t"/> is a tensor this kernel can read and write in place.</summary>
    public static bool Fits(Tensor t) => Readable(t) && t.is_contiguous();

    /// <summary>Whether <paramref name="t"/> is a float32 CPU tensor (once contiguous, one this kernel can read).</summary>
    public static bool Readable(Tensor t) => t.dtype == ScalarType.Float32 && t.device_type == TorchSharp.DeviceType.CPU;

    /// <summary>The constants of one update, as floats (libtorch casts its double Scalars to float for float tensors too).</summary>
    public readonly record struct Constants(float Beta1, float OneMinusBeta1, float Beta2, float OneMinusBeta2, float Eps,
        float GradScale, float Decay, float BiasCorrection2, float StepSize);

    /// <summary>One parameter's memory: its values, gradient and moments, each <paramref name="Count"/> floats.</summary>
    public readonly record struct Slot(IntPtr Param, IntPtr Grad, IntPtr M, IntPtr V, long Count, bool Decay);

    public static Slot SlotOf(Tensor p, Tensor grad, Tensor m, Tensor v, bool decay)
        => new(Address(p), Address(grad), Address(m), Address(v), p.numel(), decay);

    /// <summary>Updates every slot (the largest picked up first); returns when all are done.</summary>
    public static void Update(IReadOnlyList<Slot> slots, Constants c)
    {
        var order = Enumerable.Range(0, slots.Count).OrderByDescending(i => slots[i].Count).ToArray();
        Native.OpenMPTeam.Run(order.Length, i => Update(slots[order[i]], c));
    }

    /// <summary>Σ g² of each tensor, in float64, computed side by side; returned in the order given.</summary>
    public static double[] SumsOfSquares(IReadOnlyList<(IntPtr Data, long Count)> tensors)
    {
        var sums = new double[tensors.Count];
        var order = Enumerable.Range(0, tensors.Count).OrderByDescending(i => tensors[i].Count).ToArray();
        Native.OpenMPTeam.Run(order.Length, i => sums[order[i]] = SumOfSquares((float*)tensors[order[i]].Data, tensors[order[i]].Count));
        return sums;
    }

    public static IntPtr Address(Tensor t)
    {
        if (!Fits(t)) throw new ArgumentException($"expected a contiguous float32 CPU tensor, got {t.dtype} {t.device_type}");
        return (IntPtr)Native.TensorMemory.Pointer<float>(t);
    }

    private static void Update(Slot s, Constants c)
    {
        float* p = (float*)s.Param, g = (float*)s.Grad, m = (float*)s.M, v = (float*)s.V;
        long n = s.Count, i = 0;
        float decay = s.Decay ? c.Decay : 1f;
        var b1 = new Vector<float>(c.Beta1);
        var omb1 = new Vector<float>(c.OneMinusBeta1);
        var b2 = new Vector<float>(c.Beta2);
        var omb2 = new Vector<float>(c.OneMinusBeta2);
        var eps = new Vector<float>(c.Eps);
        var scale = new Vector<float>(c.GradScale);
        var dec = new Vector<float>(decay);
        var bc2 = new Vector<float>(c.BiasCorrection2);
        var step = new Vector<float>(c.StepSize);
        for (; i + Vector<float>.Count <= n; i += Vector<float>.Count)
        {
            var gi = Vector.Load(g + i) * scale;
            var mi = b1 * Vector.Load(m + i) + omb1 * gi;
            var vi = b2 * Vector.Load(v + i) + omb2 * (gi * gi);
            var pi = Vector.Load(p + i) * dec;
            pi += step * (mi / (Vector.SquareRoot(vi / bc2) + eps));
            Vector.Store(mi, m + i);
            Vector.Store(vi, v + i);
            Vector.Store(pi, p + i);
        }
        // The same operations one element at a time, so the tail rounds as the body does.
        for (; i < n; i++)
        {
            float gi = g[i] * c.GradScale;
            float mi = c.Beta1 * m[i] + c.OneMinusBeta1 * gi;
            float vi = c.Beta2 * v[i] + c.OneMinusBeta2 * (gi * gi);
            float pi = p[i] * decay;
            pi += c.StepSize * (mi / (MathF.Sqrt(vi / c.BiasCorrection2) + c.Eps));
            m[i] = mi;
            v[i] = vi;
            p[i] = pi;
        }
    }

    private static double SumOfSquares(float* g, long n)
    {
        var acc0 = Vector<double>.Zero;
        var acc1 = Vector<double>.Zero;
        long i = 0;
        for (; i + Vector<float>.Count <= n; i += Vector<float>.Count)
        {
            Vector.Widen(Vector.Load(g + i), out Vector<double> lo, out Vector<double> hi);
            acc0 += lo * lo;
            acc1 += hi * hi;
        }
        double sum = Vector.Sum(acc0 + acc1);
        for (; i < n; i++) sum += (double)g[i] * g[i];
        return sum;
    }
}
