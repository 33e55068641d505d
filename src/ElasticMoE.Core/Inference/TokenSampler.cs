using ElasticMoE.Data;

namespace ElasticMoE.Inference;

/// <summary>How the next token is drawn from the logits.</summary>
/// <param name="Temperature">Logits are divided by it; 0 = greedy (the most likely token, the lowest id on a tie).</param>
/// <param name="TopK">Only the K most likely tokens can be drawn; 0 = all.</param>
/// <param name="TopP">Only the smallest set of most likely tokens whose probability reaches P; 1 = all.</param>
/// <param name="Seed">Seed of the sampler's own generator.</param>
public sealed record SamplingOptions(double Temperature = 0.8, int TopK = 0, double TopP = 1.0, ulong Seed = 0)
{
    /// <exception cref="ArgumentException">A value out of range, naming the flag.</exception>
    public void Validate()
    {
        if (!(Temperature >= 0) || !double.IsFinite(Temperature)) throw new ArgumentException($"--temperature must be zero (greedy) or positive, got {Temperature}");
        if (TopK < 0) throw new ArgumentException($"--top-k must be zero (off) or positive, got {TopK}");
        if (!(TopP > 0 && TopP <= 1)) throw new ArgumentException($"--top-p must be in (0, 1], got {TopP}");
    }
}

/// <summary>
/// Draws tokens from logits with temperature, top-k and top-p, from its own seeded generator.
/// </summary>
/// <remarks>
/// Why not torch.multinomial: libtorch's global generator is shared by anything else in the process and its
/// sequence is libtorch's, not ours, so the same seed would not promise the same text across versions or
/// threads. Here the draw is managed code over a float array: the same logits and seed give the same token
/// on every machine. The arithmetic is in double, in a fixed order (ties broken by token id).
/// </remarks>
public sealed class TokenSampler(SamplingOptions options)
{
    private SplitMix64 _rng = new(SplitMix64.Mix(options.Seed ^ 0x5EED5A3D1E5UL));
    private int[] _order = [];
    private double[] _p = [];

    public SamplingOptions Options => options;

    /// <summary>The next token given the logits of the last position.</summary>
    public int Next(ReadOnlySpan<float> logits)
    {
        if (options.Temperature == 0) return ArgMax(logits);
        int v = logits.Length;
        if (_order.Length != v)
        {
            _order = new int[v];
            _p = new double[v];
        }
        for (int i = 0; i < v; i++) _order[i] = i;
        var l = logits.ToArray();
        // Most likely first; equal logits by token id, so the order (and the draw) is a function of the values alone.
        Array.Sort(_order, (a, b) => l[a] != l[b] ? l[b].CompareTo(l[a]) : a.CompareTo(b));
        int keep = options.TopK > 0 ? Math.Min(options.TopK, v) : v;
        double max = l[_order[0]], sum = 0;
        for (int i = 0; i < keep; i++) sum += _p[i] = Math.Exp((l[_order[i]] - max) / options.Temperature);
        if (options.TopP < 1)
        {
            double cumulative = 0;
            for (int i = 0; i < keep; i++)
            {
                cumulative += _p[i] / sum;
                if (cumulative >= options.TopP)
                {
                    keep = i + 1;
                    break;
                }
            }
            sum = 0;
            for (int i = 0; i < keep; i++) sum += _p[i];
        }
        // 53 random bits: a uniform double in [0, 1).
        double u = (_rng.Next() >> 11) * (1.0 / (1UL << 53)) * sum, acc = 0;
        for (int i = 0; i < keep; i++)
        {
            acc += _p[i];
            if (u < acc) return _order[i];
        }
        return _order[keep - 1];
    }

    public static int ArgMax(ReadOnlySpan<float> logits)
    {
        int best = 0;
        for (int i = 1; i < logits.Length; i++)
            if (logits[i] > logits[best]) best = i;
        return best;
    }
}
