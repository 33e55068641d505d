using ElasticMoE.Model;
using ElasticMoE.State;
using TorchSharp;
using static TorchSharp.torch;

namespace ElasticMoE.Training;

/// <summary>
/// AdamW over named parameters, with its moments keyed by parameter name. Written here rather than
/// taken from torch.optim because every piece of training state must be movable between actors and
/// serialisable: an expert shard owns the moments of exactly the experts placed on it, under the same
/// names the single-process loop uses, so a run gives the same numbers however it is laid out.
/// </summary>
public sealed class AdamW : IDisposable
{
    private readonly Dictionary<string, (Tensor M, Tensor V)> _moments = new(StringComparer.Ordinal);

    public double Beta1 { get; }
    public double Beta2 { get; }
    public double Eps { get; }
    public double WeightDecay { get; }

    /// <summary>Number of updates applied (the t of bias correction).</summary>
    public long StepCount { get; set; }

    public AdamW(double beta1, double beta2, double eps, double weightDecay)
    {
        Beta1 = beta1;
        Beta2 = beta2;
        Eps = eps;
        WeightDecay = weightDecay;
    }

    public IReadOnlyDictionary<string, (Tensor M, Tensor V)> Moments => _moments;

    /// <summary>
    /// One update of every parameter that has a gradient. <paramref name="gradScale"/> multiplies the
    /// gradients first (the global-norm clipping coefficient, computed over all shards by the caller).
    /// Decay applies to matrices only: norms and biases are not pulled towards zero.
    /// </summary>
    public void Step(IEnumerable<(string Name, Tensor Param)> parameters, double lr, double gradScale = 1.0)
    {
        StepCount++;
        Update(parameters, _moments, StepCount, lr, gradScale);
    }

    /// <summary>
    /// The update of global step <paramref name="step"/> (0-based) for one state unit, with the unit's
    /// own moments: the same maths as <see cref="Step"/>, bit for bit, when <see cref="StepCount"/> would
    /// be <paramref name="step"/> + 1. Bias correction comes from the global step, not from a counter of
    /// this optimizer, because a unit may arrive here mid-run from another worker: its history travels
    /// with it, and whoever holds it applies step t with the t every other unit uses.
    /// </summary>
    /// <returns>
    /// False, changing nothing, when the unit has already applied this step or a later one: an update
    /// that is redone (a retried message, a unit that moved after its update) never applies twice.
    /// </returns>
    public bool StepUnit(StateUnit unit, long step, double lr, double gradScale = 1.0)
    {
        ArgumentNullException.ThrowIfNull(unit);
        ArgumentOutOfRangeException.ThrowIfNegative(step);
        if (unit.AppliedStep >= step) return false;
        Update(unit.Parameters, unit.MomentStore, step + 1, lr, gradScale);
        unit.AppliedStep = step;
        return true;
    }

    /// <summary>One AdamW update with bias correction for update number <paramref name="t"/> (1-based).</summary>
    private void Update(IEnumerable<(string Name, Tensor Param)> parameters, Dictionary<string, (Tensor M, Tensor V)> moments,
        long t, double lr, double gradScale)
    {
        double bc1 = 1 - Math.Pow(Beta1, t);
        double bc2 = 1 - Math.Pow(Beta2, t);
        // Explicit Scalars, alive until the loop ends (see ElasticMoE.Model.Scalars for why).
        Scalar beta1 = Model.Scalars.Of(Beta1), oneMinusBeta1 = Model.Scalars.Of(1 - Beta1);
        Scalar beta2 = Model.Scalars.Of(Beta2), oneMinusBeta2 = Model.Scalars.Of(1 - Beta2), eps = Model.Scalars.Of(Eps);
        using var scale = gradScale.ToScalar();
        using var decay = (1 - lr * WeightDecay).ToScalar();
        using var biasCorrection2 = bc2.ToScalar();
        using var stepSize = (-lr / bc1).ToScalar();
        using var _ = no_grad();
        using var handles = NewDisposeScope();
        var fused = new List<AdamWKernel.Slot>();
        foreach (var (name, p) in parameters)
        {
            // The gradient's handle is taken inside the scope: a handle left to the GC would keep the
            // gradient's memory alive past zero_grad, so every step would allocate its gradients anew.
            var grad = p.grad;
            if (grad is null) continue;
            if (!moments.TryGetValue(name, out var mv))
            {
                mv = (zeros_like(p).DetachFromDisposeScope(), zeros_like(p).DetachFromDisposeScope());
                moments[name] = mv;
            }
            bool decays = WeightDecay > 0 && p.dim() >= 2;
            // Which maths applies depends on the parameter and moments alone, never on the gradient's layout: a
            // unit's copy on a mirror must take the same path as the original to stay bit-identical.
            if (AdamWKernel.Fits(p) && AdamWKernel.Fits(mv.M) && AdamWKernel.Fits(mv.V) && AdamWKernel.Readable(grad))
            {
                fused.Add(AdamWKernel.SlotOf(p, grad.contiguous(), mv.M, mv.V, decays));
                continue;
            }
            // Elsewhere (an accelerator, float64): the same maths as libtorch ops.
            using var scope = NewDisposeScope();
            var g = gradScale == 1.0 ? grad : grad.mul(scale);
            mv.M.mul_(beta1).add_(g, alpha: oneMinusBeta1);
            mv.V.mul_(beta2).addcmul_(g, g, value: oneMinusBeta2);
            if (decays) p.mul_(decay);
            var denom = mv.V.div(biasCorrection2).sqrt_().add_(eps, Model.Scalars.One);
            p.addcdiv_(mv.M, denom, value: stepSize);
        }
        if (fused.Count > 0)
            AdamWKernel.Update(fused, new AdamWKernel.Constants((float)Beta1, (float)(1 - Beta1), (float)Beta2, (float)(1 - Beta2),
                (float)Eps, (float)gradScale, (float)(1 - lr * WeightDecay), (float)bc2, (float)(-lr / bc1)));
    }

    /// <summary>Installs moments (e.g. from a checkpoint or a migrated shard). Takes ownership of the tensors.</summary>
    public void SetMoments(string name, Tensor m, Tensor v)
    {
        if (_moments.Remove(name, out var old))
        {
            old.M.Dispose();
            old.V.Dispose();
        }
        _moments[name] = (m, v);
    }

    public void Dispose()
    {
        foreach (var (m, v) in _moments.Values)
        {
            m.Dispose();
            v.Dispose();
        }
        _moments.Clear();
    }
}

/// <summary>Linear warmup to the peak rate, then cosine decay to the floor at the last step.</summary>
public static class LrSchedule
{
    public static double At(long step, long totalSteps, double peak, double floor, long warmup)
    {
        if (warmup > 0 && step < warmup) return peak * (step + 1) / warmup;
        if (totalSteps <= warmup) return peak;
        double progress = Math.Clamp((double)(step - warmup) / Math.Max(1, totalSteps - warmup - 1), 0, 1);
        return floor + 0.5 * (peak - floor) * (1 + Math.Cos(Math.PI * progress));
    }
}

/// <summary>Global-norm gradient clipping maths, split so shards can each contribute their sum of squares.</summary>
public static class GradClip
{
    /// <summary>Σ g² of every gradient given, added up in the order given (null gradients skipped).</summary>
    public static double SumOfSquares(IEnumerable<Tensor> parameters)
    {
        double total = 0;
        foreach (var s in PerTensor(parameters.ToList())) total += s;
        return total;
    }

    /// <summary>
    /// Σ g² of each named parameter that has a gradient (float64, one fixed pass per tensor: the same bits for the
    /// same gradient wherever it is computed), for <see cref="CanonicalTotal"/>.
    /// </summary>
    public static Dictionary<string, double> SumsOfSquares(IEnumerable<(string Name, Tensor Param)> parameters)
    {
        var list = parameters.ToList();
        var sums = PerTensor(list.Select(p => p.Param).ToList());
        var byName = new Dictionary<string, double>(StringComparer.Ordinal);
        for (int i = 0; i < list.Count; i++)
            if (list[i].Param.grad is not null) byName.Add(list[i].Name, sums[i]);
        return byName;
    }

    /// <summary>
    /// The global squared norm: the parameters' sums of squares added in ordinal order of their names — one order
    /// for every layout, whichever worker computed which part (the stages, the shards, the single-process loop).
    /// </summary>
    /// <remarks>
    /// Why: adding per stage, then by rank, made the norm (so the clip scale, so every update) differ in its last bit
    /// between PP 1 and PP 2. Each name must come once: a replicated expert or a replica's dense unit is reported by
    /// one holder only.
    /// </remarks>
    /// <exception cref="InvalidOperationException">A name came twice.</exception>
    public static double CanonicalTotal(IEnumerable<KeyValuePair<string, double>> sums)
    {
        var sorted = new SortedDictionary<string, double>(StringComparer.Ordinal);
        foreach (var (name, sq) in sums)
            if (!sorted.TryAdd(name, sq)) throw new InvalidOperationException($"the gradient of {name} was counted twice in the norm");
        double total = 0;
        foreach (var sq in sorted.Values) total += sq;
        return total;
    }

    // Per tensor, in the order given (0 where there is no gradient): float32 CPU gradients by the fused kernel,
    // anything else by libtorch ops.
    private static double[] PerTensor(IReadOnlyList<Tensor> parameters)
    {
        using var scope = NewDisposeScope();
        var sums = new double[parameters.Count];
        var fused = new List<(IntPtr, long)>();
        var fusedAt = new List<int>();
        for (int i = 0; i < parameters.Count; i++)
        {
            if (parameters[i].grad is not { } g) continue;
            if (AdamWKernel.Readable(g))
            {
                g = g.contiguous();
                fused.Add((AdamWKernel.Address(g), g.numel()));
                fusedAt.Add(i);
                continue;
            }
            // x * x, not square(): TorchSharp's square() is pow(2) with an implicit Scalar (see Scalars).
            var g64 = g.to(ScalarType.Float64);
            sums[i] = g64.mul(g64).sum().item<double>();
        }
        var fusedSums = AdamWKernel.SumsOfSquares(fused);
        for (int k = 0; k < fusedAt.Count; k++) sums[fusedAt[k]] = fusedSums[k];
        return sums;
    }

    /// <summary>Multiplier for all gradients: 1 when under the limit, else maxNorm / norm.</summary>
    public static double Coefficient(double sumOfSquares, double maxNorm)
    {
        if (maxNorm <= 0) return 1.0;
        double norm = Math.Sqrt(sumOfSquares);
        return norm > maxNorm ? maxNorm / (norm + 1e-6) : 1.0;
    }
}

/// <summary>Load-balance statistics of one MoE layer's token counts.</summary>
public static class LoadBalance
{
    /// <summary>MaxVio = (max load − mean load) / mean load (DeepSeek's imbalance measure); 0 when balanced.</summary>
    public static double MaxVio(ReadOnlySpan<long> load)
    {
        if (load.Length == 0) return 0;
        long max = 0, sum = 0;
        foreach (var l in load)
        {
            sum += l;
            max = Math.Max(max, l);
        }
        double mean = (double)sum / load.Length;
        return mean == 0 ? 0 : (max - mean) / mean;
    }

    /// <summary>Mean of the per-layer MaxVio values.</summary>
    public static double MeanMaxVio(IReadOnlyList<long[]> perLayer)
        => perLayer.Count == 0 ? 0 : perLayer.Average(l => MaxVio(l));
}
