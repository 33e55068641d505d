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
/// <para>Maths: per chunk, forward h = x W13ᵀ (gate and up projections in one GEMM, W13 = [W1; W3]),
/// a = silu(g) · u, y = a W2ᵀ; backward dA = dY W2, dW2 = dYᵀ a, du = dA · silu(g),
/// dg = dA · u · silu′(g) with silu′ = s + silu · (1 − s), dW13 = [dg du]ᵀ x, dx = [dg du] W13. Two GEMMs
/// forward and four backward per chunk, against three and six for a SwiGLU under autograd; the elementwise
/// steps are one pass each way (<see cref="SwiGLUMath"/>), and only h and a are kept for the backward.</para>
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
    /// (2-core VM, 186–197 for the dense model's 1,024-row GEMMs), and every chunk costs ~16 calls; the layer's
    /// forward and backward took 5 % longer with 256-row chunks and 11 % longer with 128 (same run).
    /// </summary>
    internal const long ChunkRows = 512;

    public override string Name => nameof(SwiGLUChunks);

    /// <summary>
    /// Runs <paramref name="segments"/> on <paramref name="inputs"/>; returns one output per input, of its shape,
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

    // Every tensor that outlives a chunk is made here, on the calling thread, and the team's threads only write
    // into it (addmm_ with beta 0 is the kernel mm itself uses): a tensor is then made and disposed on one
    // thread, which keeps TorchSharp's per-thread live-tensor counts, and so the leak checks, true.
    public override List<Tensor> forward(autograd.AutogradContext ctx, params object[] vars)
    {
        var job = (Job)vars[0];
        int inputs = job.Inputs, ffns = job.Ffns.Length, chunks = job.Chunks.Length;
        var x = new Tensor[inputs];
        for (int i = 0; i < inputs; i++) x[i] = ((Tensor)vars[1 + i]).contiguous();
        var w13 = new Tensor[ffns];
        var w2 = new Tensor[ffns];
        for (int f = 0; f < ffns; f++)
        {
            w13[f] = cat([(Tensor)vars[1 + inputs + 3 * f], (Tensor)vars[2 + inputs + 3 * f]], 0);
            w2[f] = (Tensor)vars[3 + inputs + 3 * f];
        }
        var outputs = x.Select(t => empty_like(t)).ToArray();
        var saved = new Tensor[2 * chunks];
        for (int c = 0; c < chunks; c++)
        {
            var ch = job.Chunks[c];
            long hid = job.Hidden[ch.Ffn];
            var like = x[ch.Input];
            saved[2 * c] = empty(ch.Rows, 2 * hid, dtype: like.dtype, device: like.device);     // h = x W13ᵀ = [g | u]
            saved[2 * c + 1] = empty(ch.Rows, hid, dtype: like.dtype, device: like.device);     // a = silu(g) u
        }
        Native.OpenMPTeam.Run(job.Chunks.Length, c =>
        {
            var ch = job.Chunks[c];
            var (h, a) = (saved[2 * c], saved[2 * c + 1]);
            using (var xc = x[ch.Input].narrow(0, ch.Offset, ch.Rows))
            using (var w13t = w13[ch.Ffn].t())
                h.addmm_(xc, w13t, beta: 0, alpha: 1);
            SwiGLUMath.Forward(h, a);
            using var yc = outputs[ch.Input].narrow(0, ch.Offset, ch.Rows);
            using var w2t = w2[ch.Ffn].t();
            yc.addmm_(a, w2t, beta: 0, alpha: 1);
        });
        if (job.KeepForBackward)
        {
            ctx.save_data(nameof(Job), job);
            ctx.save_for_backward([.. x, .. w13, .. w2, .. saved]);
        }
        return [.. outputs];
    }

    public override List<Tensor> backward(autograd.AutogradContext ctx, List<Tensor> grads)
    {
        var job = (Job)ctx.get_data(nameof(Job));
        int inputs = job.Inputs, ffns = job.Ffns.Length, chunks = job.Chunks.Length;
        using var scope = NewDisposeScope();
        var saved = ctx.get_saved_variables();
        var x = saved.GetRange(0, inputs);
        var w13 = saved.GetRange(inputs, ffns);
        var w2 = saved.GetRange(inputs + ffns, ffns);
        int s0 = inputs + 2 * ffns;
        var dy = grads.Select(g => g.contiguous()).ToArray();
        var dx = x.Select(t => empty_like(t)).ToArray();
        var dw13 = new Tensor[chunks];
        var dw2 = new Tensor[chunks];
        for (int c = 0; c < chunks; c++)
        {
            var f = job.Chunks[c].Ffn;
            dw13[c] = empty_like(w13[f]);
            dw2[c] = empty_like(w2[f]);
        }
        Native.OpenMPTeam.Run(job.Chunks.Length, c =>
        {
            using var chunkScope = NewDisposeScope();
            var ch = job.Chunks[c];
            var (h, a) = (saved[s0 + 2 * c], saved[s0 + 2 * c + 1]);
            var xc = x[ch.Input].narrow(0, ch.Offset, ch.Rows);
            var dyc = dy[ch.Input].narrow(0, ch.Offset, ch.Rows);
            var da = dyc.mm(w2[ch.Ffn]);
            dw2[c].addmm_(dyc.t(), a, beta: 0, alpha: 1);
            var dh = empty_like(h);
            SwiGLUMath.Backward(h, da, dh);
            dw13[c].addmm_(dh.t(), xc, beta: 0, alpha: 1);
            dx[ch.Input].narrow(0, ch.Offset, ch.Rows).addmm_(dh, w13[ch.Ffn], beta: 0, alpha: 1);
        });

        var result = new List<Tensor>(1 + inputs + 3 * ffns) { null! };
        result.AddRange(dx);
        for (int f = 0; f < ffns; f++)
        {
            // Partial gradients in row order, whatever order the team finished them in.
            Tensor? g13 = null, g2 = null;
            foreach (var c in job.ChunksInRowOrder[f])
            {
                g13 = g13 is null ? dw13[c] : g13.Plus(dw13[c]);
                g2 = g2 is null ? dw2[c] : g2.Plus(dw2[c]);
            }
            long hid = job.Hidden[f];
            result.Add(g13!.narrow(0, 0, hid));
            result.Add(g13!.narrow(0, hid, hid));
            result.Add(g2!);
        }
        // Out to the caller's scope: libtorch takes its references once this returns.
        foreach (var t in result) t?.MoveToOuterDisposeScope();
        return result;
    }

    internal readonly record struct Chunk(int Ffn, int Input, long Offset, long Rows);

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

    /// <summary>What one call computes: the distinct SwiGLUs, and the chunks, longest first (the order the workers pick them up).</summary>
    internal sealed class Job
    {
        public required int Inputs { get; init; }
        public required SwiGLU[] Ffns { get; init; }
        public required long[] Hidden { get; init; }
        public required Chunk[] Chunks { get; init; }
        /// <summary>Per SwiGLU, its chunks' indices in row order: the order its partial weight gradients are summed.</summary>
        public required int[][] ChunksInRowOrder { get; init; }
        public bool KeepForBackward { get; set; }

        public static Job Plan(IReadOnlyList<Tensor> inputs, IReadOnlyList<SwiGLUSegment> segments)
        {
            var ffns = new List<SwiGLU>();
            var index = new Dictionary<SwiGLU, int>(ReferenceEqualityComparer.Instance);
            var chunks = new List<Chunk>();
            var covered = new long[inputs.Count];
            foreach (var seg in segments)
            {
                if (seg.Input < 0 || seg.Input >= inputs.Count || seg.Rows < 0 || seg.Offset != covered[seg.Input])
                    throw new ArgumentException($"segments must cover each input's rows in order, once: got {seg.Rows} rows at {seg.Offset} of input {seg.Input}");
                covered[seg.Input] += seg.Rows;
                if (seg.Rows == 0) continue;
                if (!index.TryGetValue(seg.Ffn, out int f))
                {
                    index[seg.Ffn] = f = ffns.Count;
                    ffns.Add(seg.Ffn);
                }
                foreach (var (o, rows) in Cut(seg.Rows))
                    chunks.Add(new Chunk(f, seg.Input, seg.Offset + o, rows));
            }
            for (int i = 0; i < inputs.Count; i++)
                if (covered[i] != inputs[i].shape[0])
                    throw new ArgumentException($"segments cover {covered[i]} of input {i}'s {inputs[i].shape[0]} rows");
            // Row order per SwiGLU (the order chunks were made in), then longest first for the workers.
            var rowOrder = Enumerable.Range(0, chunks.Count).ToArray();
            var byFfn = ffns.Select((_, f) => rowOrder.Where(c => chunks[c].Ffn == f).ToList()).ToArray();
            var pickUp = rowOrder.OrderByDescending(c => chunks[c].Rows * (long)ffns[chunks[c].Ffn].W2.shape[1]).ToArray();
            var position = new int[chunks.Count];
            for (int p = 0; p < pickUp.Length; p++) position[pickUp[p]] = p;
            return new Job
            {
                Inputs = inputs.Count,
                Ffns = [.. ffns],
                Hidden = [.. ffns.Select(f => f.W2.shape[1])],
                Chunks = [.. pickUp.Select(c => chunks[c])],
                ChunksInRowOrder = [.. byFfn.Select(list => list.Select(c => position[c]).ToArray())],
            };
        }
    }
}
