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

    private static void Forward<T>(Tensor logitsT, Tensor biasT, Tensor scoresT, Tensor gatesT, Tensor indicesT, MoEOptions o)
        where T : unmanaged, IFloatingPointIeee754<T>
    {
        ReadOnlySpan<T> logits = Span<T>(logitsT), bias = Span<T>(biasT);
        Span<T> scores = Span<T>(scoresT), gates = Span<T>(gatesT);
        var indices = Span<long>(indicesT);
        int e = o.RoutedExperts, k = o.TopK;
        long n = logitsT.shape[0];
        bool sigmoid = o.Scoring == RouterScoring.Sigmoid;
        T scale = T.CreateChecked(o.RouteScale);
        Span<bool> taken = stackalloc bool[e];
        for (long t = 0; t < n; t++)
        {
            var l = logits.Slice((int)(t * e), e);
            var s = scores.Slice((int)(t * e), e);
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
            var g = gates.Slice((int)(t * k), k);
            var idx = indices.Slice((int)(t * k), k);
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
    private static void Backward<T>(Tensor scoresT, Tensor indicesT, Tensor dGatesT, Tensor dLogitsT, MoEOptions o)
        where T : unmanaged, IFloatingPointIeee754<T>
    {
        ReadOnlySpan<T> scores = Span<T>(scoresT), dGates = Span<T>(dGatesT);
        ReadOnlySpan<long> indices = Span<long>(indicesT);
        Span<T> dLogits = Span<T>(dLogitsT);
        int e = o.RoutedExperts, k = o.TopK;
        long n = scoresT.shape[0];
        bool sigmoid = o.Scoring == RouterScoring.Sigmoid;
        T scale = T.CreateChecked(o.RouteScale);
        for (long t = 0; t < n; t++)
        {
            var s = scores.Slice((int)(t * e), e);
            var ds = dLogits.Slice((int)(t * e), e); // ∂L/∂s first, turned into ∂L/∂logit below
            ds.Clear();
            var dg = dGates.Slice((int)(t * k), k);
            var idx = indices.Slice((int)(t * k), k);
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
