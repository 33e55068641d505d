using System.Numerics;
using ElasticMoE.Configuration;
using static ElasticMoE.Native.TensorMemory;
using static TorchSharp.torch;

namespace ElasticMoE.Model;

/// <summary>
/// The router after its logits, on a CPU: scores, top-k choice on score + bias, and gates, forward and backward,
/// as one autograd node computed in plain loops over the [N, E] logits (its gradient reaches the logits through the gates).
/// </summary>
/// <remarks>
/// As libtorch ops this was a dozen calls forward (sigmoid, the bias added to a detached copy, topk, gather, sum,
/// divide, scale) and as many backward, on tensors of a few thousand elements: call overhead for microseconds of
/// arithmetic. The router's forward and backward, logits GEMM included, went from 0.79 to 0.45 ms per layer and
/// micro-batch of the default model (2-core VM). Same maths: the gates come from the unbiased scores, normalised over
/// the chosen experts under sigmoid scoring, then scaled; the bias only decides the choice. Ties go to the lower
/// expert index.
/// </remarks>
internal sealed class RouteFunction : autograd.MultiTensorFunction<RouteFunction>
{
    public override string Name => nameof(RouteFunction);

    /// <summary>Whether this path serves <paramref name="logits"/> (float32 or float64 on a CPU).</summary>
    public static bool Serves(Tensor logits)
        => logits.device_type == TorchSharp.DeviceType.CPU && logits.dtype is ScalarType.Float32 or ScalarType.Float64;

    /// <summary>
    /// Routes by <paramref name="logits"/> [N, E]. The gates are the node's one output; the indices carry no gradient,
    /// and the scores carry one (as tensor ops on the logits) only when the sequence-wise balance loss reads them.
    /// </summary>
    /// <remarks>
    /// One output, because TorchSharp makes the zeros for an output whose gradient never arrives from that output's
    /// handle, disposed by then with the layer's scope: the scores are often unused (alpha = 0, evaluation), the gates
    /// never are (combine reads them).
    /// </remarks>
    public static Routing Route(Tensor logits, Tensor bias, MoEOptions options)
    {
        var call = new Call(options);
        var gates = apply(logits, bias, call)[0];
        var scores = options.SequenceAuxAlpha > 0 && logits.requires_grad && is_grad_enabled()
            ? (options.Scoring == RouterScoring.Sigmoid ? logits.sigmoid() : logits.softmax(-1))
            : call.Scores!;
        return new Routing(call.Indices!, gates, scores);
    }

    private sealed record Call(MoEOptions Options)
    {
        public Tensor? Indices { get; set; }
        public Tensor? Scores { get; set; }
    }

    public override List<Tensor> forward(autograd.AutogradContext ctx, params object[] vars)
    {
        var (logits, bias, call) = (((Tensor)vars[0]).contiguous(), (Tensor)vars[1], (Call)vars[2]);
        var o = call.Options;
        long n = logits.shape[0];
        int e = checked((int)logits.shape[1]), k = o.TopK;
        if (e != o.RoutedExperts || k > e) throw new ArgumentException($"logits [{n}, {e}] for {o.RoutedExperts} experts, top-{k}");
        var scores = empty_like(logits);
        var gates = empty(n, k, dtype: logits.dtype, device: logits.device);
        var indices = empty(n, k, dtype: ScalarType.Int64, device: logits.device);
        using (var b = bias.to(logits.dtype).contiguous())
        {
            if (logits.dtype == ScalarType.Float64) Forward<double>(logits, b, scores, gates, indices, o);
            else Forward<float>(logits, b, scores, gates, indices, o);
        }
        ctx.save_data(nameof(MoEOptions), o);
        ctx.save_for_backward([scores, indices]);
        call.Indices = indices;
        call.Scores = scores;
        return [gates];
    }

    public override List<Tensor> backward(autograd.AutogradContext ctx, List<Tensor> grads)
    {
        var o = (MoEOptions)ctx.get_data(nameof(MoEOptions));
        var saved = ctx.get_saved_variables();
        var (scores, indices) = (saved[0], saved[1]);
        using var scope = NewDisposeScope();
        var dGates = grads[0].contiguous();
        var dLogits = empty_like(scores);
        if (scores.dtype == ScalarType.Float64) Backward<double>(scores, indices, dGates, dLogits, o);
        else Backward<float>(scores, indices, dGates, dLogits, o);
        return [dLogits.MoveToOuterDisposeScope(), null!, null!];
    }

    /// <summary>
    /// Rows per piece of the routing loops on the OpenMP team (a row's arithmetic is its own, so the pieces change no
    /// bit). 1,024 tokens make four pieces; the node's forward went 88 → 71–77 µs (65 → 54–57 without grad), 2 threads,
    /// the rest of it being its allocations and calls.
    /// </summary>
    internal const int PieceRows = 256;

    private static int Pieces(long rows) => checked((int)((rows + PieceRows - 1) / PieceRows));

    private static unsafe void Forward<T>(Tensor logitsT, Tensor biasT, Tensor scoresT, Tensor gatesT, Tensor indicesT, MoEOptions o)
        where T : unmanaged, IFloatingPointIeee754<T>
    {
        nint logits = (nint)Pointer<T>(logitsT), bias = (nint)Pointer<T>(biasT), scores = (nint)Pointer<T>(scoresT), gates = (nint)Pointer<T>(gatesT);
        nint indices = (nint)Pointer<long>(indicesT);
        long n = logitsT.shape[0];
        Native.OpenMPTeam.Run(Pieces(n), p =>
        {
            long from = (long)p * PieceRows;
            ForwardRows((T*)logits, (T*)bias, (T*)scores, (T*)gates, (long*)indices, from, Math.Min(n, from + PieceRows), o);
        });
    }

    private static unsafe void ForwardRows<T>(T* logitsP, T* biasP, T* scoresP, T* gatesP, long* indicesP, long from, long to, MoEOptions o)
        where T : unmanaged, IFloatingPointIeee754<T>
    {
        int e = o.RoutedExperts, k = o.TopK;
        bool sigmoid = o.Scoring == RouterScoring.Sigmoid;
        T scale = T.CreateChecked(o.RouteScale);
        Span<bool> taken = stackalloc bool[e];
        var bias = new ReadOnlySpan<T>(biasP, e);
        for (long t = from; t < to; t++)
        {
            var l = new ReadOnlySpan<T>(logitsP + t * e, e);
            var s = new Span<T>(scoresP + t * e, e);
            if (sigmoid)
            {
                for (int i = 0; i < e; i++) s[i] = T.One / (T.One + T.Exp(-l[i]));
            }
            else
            {
                T max = l[0];
                for (int i = 1; i < e; i++) max = T.Max(max, l[i]);
                T sum = T.Zero;
                for (int i = 0; i < e; i++) sum += s[i] = T.Exp(l[i] - max);
                for (int i = 0; i < e; i++) s[i] /= sum;
            }
            // Top-k of score + bias, best first; ties (and NaNs) to the lower index.
            taken.Clear();
            var g = new Span<T>(gatesP + t * k, k);
            var idx = new Span<long>(indicesP + t * k, k);
            T chosenSum = T.Zero;
            for (int j = 0; j < k; j++)
            {
                int best = -1;
                T bestValue = T.Zero;
                for (int i = 0; i < e; i++)
                {
                    if (taken[i]) continue;
                    T v = s[i] + bias[i];
                    if (best < 0 || v > bestValue) (best, bestValue) = (i, v);
                }
                taken[best] = true;
                idx[j] = best;
                g[j] = s[best];
                chosenSum += s[best];
            }
            for (int j = 0; j < k; j++) g[j] = (sigmoid ? g[j] / chosenSum : g[j]) * scale;
        }
    }

    // dGates [N, k] back to dLogits [N, E]. Sigmoid: g_j = c s_j / S over the chosen (S = Σ s),
    // so ∂L/∂s_j += c (dG_j / S − Σ_l dG_l s_l / S²) for chosen j, and ∂L/∂logit = ∂L/∂s · s (1 − s).
    // Softmax: g_j = c s_j, so ∂L/∂s_j += c dG_j, and ∂L/∂logit_i = s_i (∂L/∂s_i − Σ_l ∂L/∂s_l s_l).
    private static unsafe void Backward<T>(Tensor scoresT, Tensor indicesT, Tensor dGatesT, Tensor dLogitsT, MoEOptions o)
        where T : unmanaged, IFloatingPointIeee754<T>
    {
        nint scores = (nint)Pointer<T>(scoresT), dGates = (nint)Pointer<T>(dGatesT), dLogits = (nint)Pointer<T>(dLogitsT);
        nint indices = (nint)Pointer<long>(indicesT);
        long n = scoresT.shape[0];
        Native.OpenMPTeam.Run(Pieces(n), p =>
        {
            long from = (long)p * PieceRows;
            BackwardRows((T*)scores, (long*)indices, (T*)dGates, (T*)dLogits, from, Math.Min(n, from + PieceRows), o);
        });
    }

    private static unsafe void BackwardRows<T>(T* scoresP, long* indicesP, T* dGatesP, T* dLogitsP, long from, long to, MoEOptions o)
        where T : unmanaged, IFloatingPointIeee754<T>
    {
        int e = o.RoutedExperts, k = o.TopK;
        bool sigmoid = o.Scoring == RouterScoring.Sigmoid;
        T scale = T.CreateChecked(o.RouteScale);
        for (long t = from; t < to; t++)
        {
            var s = new ReadOnlySpan<T>(scoresP + t * e, e);
            var ds = new Span<T>(dLogitsP + t * e, e); // ∂L/∂s first, turned into ∂L/∂logit below
            ds.Clear();
            var dg = new ReadOnlySpan<T>(dGatesP + t * k, k);
            var idx = new ReadOnlySpan<long>(indicesP + t * k, k);
            if (sigmoid)
            {
                T sum = T.Zero, weighted = T.Zero;
                for (int j = 0; j < k; j++)
                {
                    sum += s[(int)idx[j]];
                    weighted += dg[j] * s[(int)idx[j]];
                }
                for (int j = 0; j < k; j++)
                    ds[(int)idx[j]] += scale * (dg[j] / sum - weighted / (sum * sum));
                for (int i = 0; i < e; i++) ds[i] *= s[i] * (T.One - s[i]);
            }
            else
            {
                for (int j = 0; j < k; j++) ds[(int)idx[j]] += scale * dg[j];
                T dot = T.Zero;
                for (int i = 0; i < e; i++) dot += ds[i] * s[i];
                for (int i = 0; i < e; i++) ds[i] = s[i] * (ds[i] - dot);
            }
        }
    }
}
