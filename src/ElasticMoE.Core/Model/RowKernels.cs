using System.Numerics;
using static ElasticMoE.Native.TensorMemory;
using static TorchSharp.torch;

namespace ElasticMoE.Model;

/// <summary>
/// Dispatch's backward and combine's forward and backward on a CPU: per token, its k assignments' rows read by
/// position and summed in slot order, one pass over raw memory, blocks of tokens side by side on libtorch's OpenMP
/// team. As tensor ops, combine was a gather of N·k rows, a product with the gates, a sum over the slots and the
/// shared expert's add forward, and two gathers, two products and a sum backward: 0.44 ms per layer and
/// micro-batch of the default model (2-core VM), most of it passes over [N, k, d] copies.
/// </summary>
/// <remarks>
/// Deterministic: every output row (and every gate's gradient) is written once, by one thread, summing in a fixed
/// order (slot order; a dot product's lanes, then its tail). Dropped assignments (position = M) read nothing.
/// </remarks>
internal static unsafe class RowKernels
{
    private const int Block = 128;

    /// <summary>Whether the tensors can be read in place: float32 or float64, contiguous, on a CPU, one dtype.</summary>
    public static bool Serve(params Tensor?[] tensors)
    {
        var first = tensors[0]!;
        if (first.dtype is not (ScalarType.Float32 or ScalarType.Float64)) return false;
        foreach (var t in tensors)
            if (t is not null && (t.dtype != first.dtype || t.device_type != TorchSharp.DeviceType.CPU || !t.is_contiguous())) return false;
        return true;
    }

    /// <summary>y[t] = Σ_slot gate[t, slot] · rows[position[t, slot]] (+ shared[t]), for t &lt; N.</summary>
    public static void Combine(Tensor rows, Tensor gates, Tensor position, Tensor? shared, Tensor y)
    {
        if (rows.dtype == ScalarType.Float64) Combine<double>(rows, gates, position, shared, y);
        else Combine<float>(rows, gates, position, shared, y);
    }

    /// <summary>Combine's backward: dRows[m] = gate of row m's assignment · dy[token of m]; dGates[t, s] = rows[position[t, s]] · dy[t].</summary>
    public static void CombineBackward(Tensor rows, Tensor gates, Tensor position, Tensor token, Tensor assignment, Tensor dy, Tensor dRows, Tensor dGates)
    {
        if (rows.dtype == ScalarType.Float64) CombineBackward<double>(rows, gates, position, token, assignment, dy, dRows, dGates);
        else CombineBackward<float>(rows, gates, position, token, assignment, dy, dRows, dGates);
    }

    /// <summary>Dispatch's backward: dx[t] = Σ_slot dRows[position[t, slot]] — combine with unit gates, no shared output.</summary>
    public static void GatherSum(Tensor dRows, Tensor position, Tensor dx)
    {
        if (dRows.dtype == ScalarType.Float64) Combine<double>(dRows, null, position, null, dx);
        else Combine<float>(dRows, null, position, null, dx);
    }

    private static int Blocks(long n) => (int)((n + Block - 1) / Block);

    // Without gates (dispatch's backward) every row counts once: Add, not a product with 1, so nothing rounds.
    private static void Combine<T>(Tensor rowsT, Tensor? gatesT, Tensor positionT, Tensor? sharedT, Tensor yT) where T : unmanaged, INumber<T>
    {
        long n = yT.shape[0], m = rowsT.shape[0];
        int d = checked((int)yT.shape[1]), k = checked((int)(positionT.numel() / Math.Max(1, n)));
        T* rows = Pointer<T>(rowsT), gates = gatesT is null ? null : Pointer<T>(gatesT), y = Pointer<T>(yT);
        T* shared = sharedT is null ? null : Pointer<T>(sharedT);
        long* position = Pointer<long>(positionT);
        Native.OpenMPTeam.Run(Blocks(n), b =>
        {
            for (long t = (long)b * Block, end = Math.Min(n, t + Block); t < end; t++)
            {
                T* yt = y + t * d;
                new Span<T>(yt, d).Clear();
                for (int s = 0; s < k; s++)
                {
                    long p = position[t * k + s];
                    if (p >= m) continue;
                    if (gates == null) Add(yt, rows + p * d, d);
                    else AddScaled(yt, rows + p * d, gates[t * k + s], d);
                }
                if (shared != null) Add(yt, shared + t * d, d);
            }
        });
    }

    private static void CombineBackward<T>(Tensor rowsT, Tensor gatesT, Tensor positionT, Tensor tokenT, Tensor assignmentT, Tensor dyT, Tensor dRowsT, Tensor dGatesT)
        where T : unmanaged, INumber<T>
    {
        long n = dyT.shape[0], m = rowsT.shape[0];
        int d = checked((int)dyT.shape[1]), k = checked((int)gatesT.shape[1]);
        T* rows = Pointer<T>(rowsT), gates = Pointer<T>(gatesT), dy = Pointer<T>(dyT), dRows = Pointer<T>(dRowsT), dGates = Pointer<T>(dGatesT);
        long* position = Pointer<long>(positionT), token = Pointer<long>(tokenT), assignment = Pointer<long>(assignmentT);
        int rowBlocks = Blocks(m);
        Native.OpenMPTeam.Run(rowBlocks + Blocks(n), b =>
        {
            if (b < rowBlocks)
            {
                for (long r = (long)b * Block, end = Math.Min(m, r + Block); r < end; r++)
                    Scale(dRows + r * d, dy + token[r] * d, gates[assignment[r]], d);
                return;
            }
            for (long t = (long)(b - rowBlocks) * Block, end = Math.Min(n, t + Block); t < end; t++)
                for (int s = 0; s < k; s++)
                {
                    long p = position[t * k + s];
                    dGates[t * k + s] = p < m ? Dot(rows + p * d, dy + t * d, d) : T.Zero;
                }
        });
    }

    // acc += g · row
    private static void AddScaled<T>(T* acc, T* row, T g, int d) where T : unmanaged, INumber<T>
    {
        int i = 0;
        var gv = new Vector<T>(g);
        for (; i + Vector<T>.Count <= d; i += Vector<T>.Count)
            Vector.Store(Vector.Load(acc + i) + gv * Vector.Load(row + i), acc + i);
        for (; i < d; i++) acc[i] += g * row[i];
    }

    private static void Add<T>(T* acc, T* row, int d) where T : unmanaged, INumber<T>
    {
        int i = 0;
        for (; i + Vector<T>.Count <= d; i += Vector<T>.Count)
            Vector.Store(Vector.Load(acc + i) + Vector.Load(row + i), acc + i);
        for (; i < d; i++) acc[i] += row[i];
    }

    // dst = g · src
    private static void Scale<T>(T* dst, T* src, T g, int d) where T : unmanaged, INumber<T>
    {
        int i = 0;
        var gv = new Vector<T>(g);
        for (; i + Vector<T>.Count <= d; i += Vector<T>.Count)
            Vector.Store(gv * Vector.Load(src + i), dst + i);
        for (; i < d; i++) dst[i] = g * src[i];
    }

    private static T Dot<T>(T* a, T* b, int d) where T : unmanaged, INumber<T>
    {
        int i = 0;
        var acc = Vector<T>.Zero;
        for (; i + Vector<T>.Count <= d; i += Vector<T>.Count)
            acc += Vector.Load(a + i) * Vector.Load(b + i);
        T sum = Vector.Sum(acc);
        for (; i < d; i++) sum += a[i] * b[i];
        return sum;
    }
}
