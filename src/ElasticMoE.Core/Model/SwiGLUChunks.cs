using TorchSharp;
using static TorchSharp.torch;

namespace ElasticMoE.Model;

/// <summary>One SwiGLU applied to rows [<paramref name="Offset"/>, +<paramref name="Rows"/>) of input <paramref name="Input"/>.</summary>
internal readonly record struct SwiGLUSegment(SwiGLU Ffn, int Input, long Offset, long Rows);

/// <summary>
/// The CPU expert kernel: many SwiGLUs (routed experts, the shared expert) on their own row ranges, as one
/// autograd node whose forward and backward cut every segment into chunks of about <see cref="ChunkRows"/>
/// rows (<see cref="Cut"/>) and run the chunks side by side on libtorch's OpenMP team (<see cref="Native.OpenMPTeam"/>), each single-threaded.
/// </summary>
/// <remarks>
/// <para>Maths: per chunk, forward h = x W13ᵀ (gate and up projections in one GEMM, W13 = [W1; W3], copied once a
/// call), a = silu(g) · u, y = a W2ᵀ; backward dA = dY W2, dW2 = dYᵀ a, du = dA · silu(g), dg = dA · u · silu′(g)
/// with silu′ = s + silu · (1 − s), dW13 = [dg du]ᵀ x, dx = [dg du] W13. The GEMMs run on raw memory through MKL
/// (<see cref="Native.Blas"/>): a chunk makes no libtorch call at all, where as libtorch ops it made ~16 (views,
/// dispatch, allocations; forward + backward of the default layer's experts 6.1–6.3 → 5.6–5.9 ms, 2 threads, same
/// run; one GEMM for W1 and W3 rather than two saves MKL packing x twice, another 0.1–0.2 ms). The elementwise
/// steps are one pass each way (<see cref="SwiGLUMath"/>), and only h and a are kept for the backward, in one
/// block for all chunks.</para>
/// <para>Deterministic whatever the layout or the thread count: a chunk is a fixed function of its segment
/// (<see cref="Cut"/> depends on its row count alone), always computed on one thread, and a
/// weight's gradient is the sum of its chunks' partial gradients in row order. Which worker computes a chunk
/// never changes a bit, so an expert computes the same in the single process, in a shard of its own or
/// beside others, on a node with one thread or sixteen.</para>
/// </remarks>
internal sealed class SwiGLUChunks : autograd.MultiTensorFunction<SwiGLUChunks>
{
    /// <summary>
    /// Target chunk size, in rows. On the default model's layer (8 experts of ~256 rows, a 1,024-row shared
    /// expert) every routed expert is one chunk and the shared expert two: 10 chunks for the threads. Not
    /// smaller: single-threaded, the chunk's first GEMM runs at 150–170 GFLOP/s with 256 rows and 184 with 512
    /// (2-core VM, 186–197 for the dense model's 1,024-row GEMMs), and every chunk costs 6 MKL calls; the layer's
    /// forward and backward took 5 % longer with 256-row chunks and 11 % longer with 128 (same run).
    /// </summary>
    internal const long ChunkRows = 512;

    public override string Name => nameof(SwiGLUChunks);

    /// <summary>
    /// Runs <paramref name="segments"/> on <paramref name="inputs"/> (float or double CPU tensors [rows, d], see
    /// <see cref="Serves"/>); returns one output per input, of its shape,
    /// connected to autograd (inputs and every SwiGLU's weights get gradients). The segments must cover every row
    /// of every input exactly once.
    /// </summary>
    public static Tensor[] Run(IReadOnlyList<Tensor> inputs, IReadOnlyList<SwiGLUSegment> segments)
    {
        var job = Job.Plan(inputs, segments);
        var args = new object[1 + inputs.Count + 3 * job.Ffns.Length];
        args[0] = job;
        for (int i = 0; i < inputs.Count; i++) args[1 + i] = inputs[i];
        for (int f = 0; f < job.Ffns.Length; f++)
        {
            args[1 + inputs.Count + 3 * f] = job.Ffns[f].W1;
            args[2 + inputs.Count + 3 * f] = job.Ffns[f].W3;
            args[3 + inputs.Count + 3 * f] = job.Ffns[f].W2;
        }
        job.KeepForBackward = is_grad_enabled() && args.OfType<Tensor>().Any(t => t.requires_grad);
        return [.. apply(args)];
    }

    // Every tensor the kernel uses is made here, on the calling thread, and the team's threads only write into its
    // memory (through MKL, Blas): a tensor is then made and disposed on one thread, which keeps TorchSharp's
    // per-thread live-tensor counts, and so the leak checks, true.
    public override List<Tensor> forward(autograd.AutogradContext ctx, params object[] vars)
    {
        var job = (Job)vars[0];
        var x = new Tensor[job.Inputs];
        for (int i = 0; i < x.Length; i++) x[i] = ((Tensor)vars[1 + i]).contiguous();
        var w = new Tensor[3 * job.Ffns.Length];
        for (int k = 0; k < w.Length; k++) w[k] = ((Tensor)vars[1 + job.Inputs + k]).contiguous();
        var outputs = x.Select(t => empty_like(t)).ToArray();
        // W13 = [W1; W3] of every SwiGLU, and h = [g | u] and a of every chunk, each in one block.
        var w13 = empty(job.W13Elements, dtype: x[0].dtype, device: x[0].device);
        var activations = empty(job.ActivationElements, dtype: x[0].dtype, device: x[0].device);
        if (job.Double) Forward<double>(job, x, w, w13, outputs, activations);
        else Forward<float>(job, x, w, w13, outputs, activations);
        if (job.KeepForBackward)
        {
            ctx.save_data(nameof(Job), job);
            ctx.save_for_backward([.. x, w13, .. w.Where((_, k) => k % 3 == 2), activations]);
        }
        else
        {
            w13.Dispose();
            activations.Dispose();
        }
        return [.. outputs];
    }

    // Per chunk: h = x W13ᵀ, a = silu(g) u, y = a W2ᵀ.
    private static unsafe void Forward<T>(Job job, Tensor[] x, Tensor[] w, Tensor w13Block, Tensor[] y, Tensor activations)
        where T : unmanaged, System.Numerics.IFloatingPointIeee754<T>
    {
        nint[] xs = Pointers<T>(x), ws = Pointers<T>(w), ys = Pointers<T>(y);
        nint acts = (nint)Native.TensorMemory.Pointer<T>(activations), w13s = (nint)Native.TensorMemory.Pointer<T>(w13Block);
        int d = job.Width;
        Native.OpenMPTeam.Run(job.Ffns.Length, f =>
        {
            long size = (long)job.Hidden[f] * d * sizeof(T);
            T* w13 = (T*)w13s + job.W13[f];
            Buffer.MemoryCopy((T*)ws[3 * f], w13, size, size);
            Buffer.MemoryCopy((T*)ws[3 * f + 1], w13 + (long)job.Hidden[f] * d, size, size);
        });
        Native.OpenMPTeam.Run(job.Chunks.Length, c =>
        {
            var ch = job.Chunks[c];
            int rows = (int)ch.Rows, hid = job.Hidden[ch.Ffn];
            T* xc = (T*)xs[ch.Input] + ch.Offset * d, yc = (T*)ys[ch.Input] + ch.Offset * d;
            T* w13 = (T*)w13s + job.W13[ch.Ffn], w2 = (T*)ws[3 * ch.Ffn + 2];
            T* h = (T*)acts + ch.Activations, a = h + (long)rows * 2 * hid;
            Native.Blas.Gemm(false, true, rows, 2 * hid, d, xc, d, w13, d, T.Zero, h, 2 * hid);
            SwiGLUMath.Forward(h, a, rows, hid);
            Native.Blas.Gemm(false, true, rows, d, hid, a, hid, w2, hid, T.Zero, yc, d);
        });
    }

    public override List<Tensor> backward(autograd.AutogradContext ctx, List<Tensor> grads)
    {
        var job = (Job)ctx.get_data(nameof(Job));
        int ffns = job.Ffns.Length;
        using var scope = NewDisposeScope();
        var saved = ctx.get_saved_variables();
        var x = saved.GetRange(0, job.Inputs).ToArray();
        var w13 = saved[job.Inputs];
        var w2 = saved.GetRange(job.Inputs + 1, ffns).ToArray();
        var activations = saved[job.Inputs + 1 + ffns];
        var dy = grads.Select(g => g.contiguous()).ToArray();
        var dx = x.Select(t => empty_like(t)).ToArray();
        var dw13 = empty_like(w13);
        var dw2 = w2.Select(t => empty_like(t)).ToArray();
        // da and dh of every chunk: the same room as its h and a, so at the same offsets in a block of the same size.
        // The weight gradients of every chunk but the first of its SwiGLU (in row order), which writes the SwiGLU's own.
        var scratch = empty(job.ActivationElements, dtype: x[0].dtype, device: x[0].device);
        var partials = empty(job.PartialElements, dtype: x[0].dtype, device: x[0].device);
        if (job.Double) Backward<double>(job, x, w13, w2, activations, dy, dx, dw13, dw2, scratch, partials);
        else Backward<float>(job, x, w13, w2, activations, dy, dx, dw13, dw2, scratch, partials);

        var result = new List<Tensor>(1 + job.Inputs + 3 * ffns) { null! };
        result.AddRange(dx);
        for (int f = 0; f < ffns; f++)
        {
            long hd = (long)job.Hidden[f] * job.Width;
            var g13 = dw13.narrow(0, job.W13[f], 2 * hd);
            // Partial weight gradients added in row order, whatever order the team finished them in.
            foreach (var c in job.ChunksInRowOrder[f].Skip(1))
            {
                g13.add_(partials.narrow(0, job.Chunks[c].Partials, 2 * hd));
                dw2[f].add_(partials.narrow(0, job.Chunks[c].Partials + 2 * hd, hd).view_as(dw2[f]));
            }
            result.Add(g13.narrow(0, 0, hd).view(job.Hidden[f], job.Width));
            result.Add(g13.narrow(0, hd, hd).view(job.Hidden[f], job.Width));
            result.Add(dw2[f]);
        }
        // Out to the caller's scope: libtorch takes its references once this returns.
        foreach (var t in result) t?.MoveToOuterDisposeScope();
        return result;
    }

    // Per chunk: da = dy W2, dW2 = dyᵀ a, dh = [dg | du] (SwiGLUMath), dW13 = dhᵀ x, dx = dh W13.
    private static unsafe void Backward<T>(Job job, Tensor[] x, Tensor w13Block, Tensor[] w2, Tensor activations, Tensor[] dy, Tensor[] dx,
        Tensor dw13Block, Tensor[] dw2, Tensor scratch, Tensor partials) where T : unmanaged, System.Numerics.IFloatingPointIeee754<T>
    {
        nint[] xs = Pointers<T>(x), w2s = Pointers<T>(w2), dys = Pointers<T>(dy), dxs = Pointers<T>(dx), dw2s = Pointers<T>(dw2);
        nint acts = (nint)Native.TensorMemory.Pointer<T>(activations), work = (nint)Native.TensorMemory.Pointer<T>(scratch);
        nint parts = (nint)Native.TensorMemory.Pointer<T>(partials);
        nint w13s = (nint)Native.TensorMemory.Pointer<T>(w13Block), dw13s = (nint)Native.TensorMemory.Pointer<T>(dw13Block);
        int d = job.Width;
        Native.OpenMPTeam.Run(job.Chunks.Length, c =>
        {
            var ch = job.Chunks[c];
            int rows = (int)ch.Rows, hid = job.Hidden[ch.Ffn], f = ch.Ffn;
            T* xc = (T*)xs[ch.Input] + ch.Offset * d, dyc = (T*)dys[ch.Input] + ch.Offset * d, dxc = (T*)dxs[ch.Input] + ch.Offset * d;
            T* w13 = (T*)w13s + job.W13[f], w2f = (T*)w2s[f];
            T* h = (T*)acts + ch.Activations, a = h + (long)rows * 2 * hid;
            T* da = (T*)work + ch.Activations, dh = da + (long)rows * hid;
            T* g13 = (T*)dw13s + job.W13[f], g2 = (T*)dw2s[f];
            if (ch.Partials >= 0)
            {
                g13 = (T*)parts + ch.Partials;
                g2 = g13 + 2L * hid * d;
            }
            Native.Blas.Gemm(false, false, rows, hid, d, dyc, d, w2f, hid, T.Zero, da, hid);
            Native.Blas.Gemm(true, false, d, hid, rows, dyc, d, a, hid, T.Zero, g2, hid);
            SwiGLUMath.Backward(h, da, dh, rows, hid);
            Native.Blas.Gemm(true, false, 2 * hid, d, rows, dh, 2 * hid, xc, d, T.Zero, g13, d);
            Native.Blas.Gemm(false, false, rows, d, 2 * hid, dh, 2 * hid, w13, d, T.Zero, dxc, d);
        });
    }

    private static unsafe nint[] Pointers<T>(Tensor[] tensors) where T : unmanaged
        => [.. tensors.Select(t => (nint)Native.TensorMemory.Pointer<T>(t))];

    /// <summary>
    /// Rows [<paramref name="Offset"/>, +<paramref name="Rows"/>) of input <paramref name="Input"/> through SwiGLU
    /// <paramref name="Ffn"/>; where its memory lies, in elements: h and a in the activations block (and da and dh at the
    /// same offset in the backward's scratch), and its weight gradients in the partials block (−1: it writes the
    /// SwiGLU's own gradients, being its first chunk in row order).
    /// </summary>
    internal readonly record struct Chunk(int Ffn, int Input, long Offset, long Rows, long Activations = 0, long Partials = -1);

    /// <summary>
    /// A segment of <paramref name="rows"/> cut into round(rows / <see cref="ChunkRows"/>) chunks (at least one) of
    /// equal size give or take a row: (offset, rows) of each, in row order. A function of the row count alone.
    /// </summary>
    /// <remarks>
    /// Even pieces rather than full chunks and a remainder: an expert with 265 rows was a 256-row chunk and a 9-row
    /// one that cost nearly as much call overhead as a full chunk and did almost nothing; now it is one chunk.
    /// </remarks>
    internal static IEnumerable<(long Offset, long Rows)> Cut(long rows)
    {
        long pieces = Math.Max(1, (rows + ChunkRows / 2) / ChunkRows);
        long size = rows / pieces, longer = rows % pieces, offset = 0;
        for (long p = 0; p < pieces && rows > 0; p++)
        {
            long n = size + (p < longer ? 1 : 0);
            yield return (offset, n);
            offset += n;
        }
    }

    /// <summary>Whether this kernel runs on <paramref name="rows"/>: float or double on a CPU, where libtorch brought MKL (<see cref="Native.Blas"/>).</summary>
    internal static bool Serves(Tensor rows)
        => rows.device_type == DeviceType.CPU && rows.dtype is ScalarType.Float32 or ScalarType.Float64 && Native.Blas.Available;

    /// <summary>What one call computes: the distinct SwiGLUs, and the chunks, longest first (the order the workers pick them up).</summary>
    internal sealed class Job
    {
        public required int Inputs { get; init; }
        /// <summary>Model width d: columns of every input.</summary>
        public required int Width { get; init; }
        /// <summary>float64 (the gradient checks) rather than float32.</summary>
        public required bool Double { get; init; }
        public required SwiGLU[] Ffns { get; init; }
        public required int[] Hidden { get; init; }
        public required Chunk[] Chunks { get; init; }
        /// <summary>Per SwiGLU, its chunks' indices in row order: the order its partial weight gradients are summed.</summary>
        public required int[][] ChunksInRowOrder { get; init; }
        /// <summary>Per SwiGLU, where its W13 = [W1; W3] (and its gradient) starts in the W13 block, in elements.</summary>
        public required long[] W13 { get; init; }
        /// <summary>Sizes, in elements, of the blocks the offsets point into.</summary>
        public required long W13Elements { get; init; }
        public required long ActivationElements { get; init; }
        public required long PartialElements { get; init; }
        public bool KeepForBackward { get; set; }

        // Every chunk's piece of a block starts 64 bytes in: MKL may take another path, and round otherwise, on
        // memory aligned otherwise, and a chunk must compute the same bits wherever it lies in the block.
        private static long Aligned(long elements) => (elements + 15) / 16 * 16;

        public static Job Plan(IReadOnlyList<Tensor> inputs, IReadOnlyList<SwiGLUSegment> segments)
        {
            if (inputs.Count == 0) throw new ArgumentException("no inputs");
            var dtype = inputs[0].dtype;
            if (dtype is not (ScalarType.Float32 or ScalarType.Float64))
                throw new ArgumentException($"the chunked kernel computes float or double, got {dtype}");
            var rowsOf = new long[inputs.Count];
            long width = -1;
            for (int i = 0; i < inputs.Count; i++)
            {
                var t = inputs[i];
                var shape = t.shape;
                if (width < 0) width = shape[^1];
                if (shape.Length != 2 || shape[1] != width || t.dtype != dtype || t.device_type != DeviceType.CPU)
                    throw new ArgumentException($"inputs must be [rows, {width}] {dtype} CPU tensors, got {t.dtype} {t.device_type} [{string.Join(", ", shape)}]");
                rowsOf[i] = shape[0];
            }
            // Loops, not LINQ, and the SwiGLUs' own widths, not their weights' shapes (a P/Invoke and an array each):
            // this ran at 70 µs and 14 KB per call on the default layer.
            var ffns = new List<SwiGLU>(segments.Count);
            var chunks = new List<Chunk>(segments.Count + 2);
            var covered = new long[inputs.Count];
            foreach (var seg in segments)
            {
                if (seg.Input < 0 || seg.Input >= inputs.Count || seg.Rows < 0 || seg.Offset != covered[seg.Input])
                    throw new ArgumentException($"segments must cover each input's rows in order, once: got {seg.Rows} rows at {seg.Offset} of input {seg.Input}");
                covered[seg.Input] += seg.Rows;
                if (seg.Rows == 0) continue;
                int f = ffns.IndexOf(seg.Ffn);
                if (f < 0)
                {
                    if (seg.Ffn.Dim != width || seg.Ffn.W1.dtype != dtype)
                        throw new ArgumentException($"a SwiGLU of width {seg.Ffn.Dim} and dtype {seg.Ffn.W1.dtype} on {dtype} rows of width {width}");
                    f = ffns.Count;
                    ffns.Add(seg.Ffn);
                }
                foreach (var (o, rows) in Cut(seg.Rows))
                    chunks.Add(new Chunk(f, seg.Input, seg.Offset + o, rows));
            }
            for (int i = 0; i < inputs.Count; i++)
                if (covered[i] != rowsOf[i])
                    throw new ArgumentException($"segments cover {covered[i]} of input {i}'s {rowsOf[i]} rows");

            var hidden = new int[ffns.Count];
            var w13 = new long[ffns.Count];
            long w13Elements = 0;
            for (int f = 0; f < ffns.Count; f++)
            {
                hidden[f] = ffns[f].Hidden;
                w13[f] = w13Elements;
                w13Elements += Aligned(2L * hidden[f] * width);
            }
            // Row order per SwiGLU (the order chunks were made in): the first chunk of each writes its gradients, the
            // others into partials, added in this order.
            var byFfn = new List<int>[ffns.Count];
            for (int f = 0; f < ffns.Count; f++) byFfn[f] = [];
            long acts = 0, partials = 0;
            for (int c = 0; c < chunks.Count; c++)
            {
                var ch = chunks[c];
                long perRow = 3L * hidden[ch.Ffn]; // h (2H) and a (H); da (H) and dh (2H)
                long part = -1;
                if (byFfn[ch.Ffn].Count > 0)
                {
                    part = partials;
                    partials += Aligned(3L * hidden[ch.Ffn] * width);
                }
                chunks[c] = ch with { Activations = acts, Partials = part };
                acts += Aligned(ch.Rows * perRow);
                byFfn[ch.Ffn].Add(c);
            }
            // Longest first for the workers (a stable sort: ties stay in row order).
            var pickUp = new int[chunks.Count];
            for (int c = 0; c < pickUp.Length; c++) pickUp[c] = c;
            // Keys unique (work, then row order among equals), so the unstable Array.Sort orders as a stable sort would.
            var key = new long[chunks.Count];
            for (int c = 0; c < key.Length; c++) key[c] = -chunks[c].Rows * hidden[chunks[c].Ffn] * chunks.Count + c;
            Array.Sort(key, pickUp);
            var position = new int[chunks.Count];
            var ordered = new Chunk[chunks.Count];
            for (int p = 0; p < pickUp.Length; p++)
            {
                position[pickUp[p]] = p;
                ordered[p] = chunks[pickUp[p]];
            }
            var rowOrder = new int[ffns.Count][];
            for (int f = 0; f < ffns.Count; f++)
            {
                rowOrder[f] = new int[byFfn[f].Count];
                for (int j = 0; j < rowOrder[f].Length; j++) rowOrder[f][j] = position[byFfn[f][j]];
            }
            return new Job
            {
                Inputs = inputs.Count,
                Width = checked((int)width),
                Double = dtype == ScalarType.Float64,
                Ffns = [.. ffns],
                Hidden = hidden,
                Chunks = ordered,
                ChunksInRowOrder = rowOrder,
                W13 = w13,
                W13Elements = w13Elements,
                ActivationElements = acts,
                PartialElements = partials,
            };
        }
    }
}
