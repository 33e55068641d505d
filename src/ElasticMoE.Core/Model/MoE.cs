using ElasticMoE.Configuration;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ElasticMoE.Model;

/// <summary>Which experts each token goes to, and with what gate.</summary>
/// <param name="Indices">[N, k] expert ids (long), chosen on score + bias.</param>
/// <param name="Gates">[N, k] gate weights, from the scores only (bias never enters a gate).</param>
/// <param name="Scores">[N, E] router affinities (sigmoid or softmax of the logits).</param>
public sealed record Routing(Tensor Indices, Tensor Gates, Tensor Scores);

/// <summary>
/// Top-k router with DeepSeek-V3 aux-loss-free balancing: a per-expert bias shifts which experts are
/// chosen, but the gates come from the unbiased scores, so balancing never distorts the output mix.
/// </summary>
public sealed class Router : nn.Module<Tensor, Routing>
{
    private readonly Linear gate;
    private readonly Tensor expert_bias;
    private readonly MoEOptions _o;

    public Router(int dim, MoEOptions options) : base(nameof(Router))
    {
        _o = options;
        gate = nn.Linear(dim, options.RoutedExperts, hasBias: false);
        // A buffer, not a parameter: it moves by the sign rule, never by gradients, and is saved with the model.
        expert_bias = zeros(options.RoutedExperts);
        register_buffer("expert_bias", expert_bias);
        RegisterComponents();
    }

    public Tensor Bias => expert_bias;
    public Linear Gate => gate;
    public MoEOptions Options => _o;

    /// <summary>Routes x of shape [N, d].</summary>
    public override Routing forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var logits = gate.forward(x);
        var r = RouteFunction.Serves(logits) ? RouteFunction.Route(logits, expert_bias, _o) : RouteWithOps(logits);
        return new Routing(r.Indices.MoveToOuterDisposeScope(), r.Gates.MoveToOuterDisposeScope(), r.Scores.MoveToOuterDisposeScope());
    }

    /// <summary>
    /// The routing of <paramref name="logits"/> [N, E] as tensor ops under autograd: the accelerator's path, and on a
    /// CPU the reference <see cref="RouteFunction"/> is tested against.
    /// </summary>
    internal Routing RouteWithOps(Tensor logits)
    {
        using var scope = NewDisposeScope();
        var scores = _o.Scoring == RouterScoring.Sigmoid ? logits.sigmoid() : logits.softmax(-1);
        Tensor indices;
        using (no_grad())
            indices = scores.detach().Plus(expert_bias.to(scores.dtype)).topk(_o.TopK, dim: -1).indexes;
        var gates = scores.gather(-1, indices);
        if (_o.Scoring == RouterScoring.Sigmoid)
            gates = gates / gates.sum(-1, keepdim: true);
        gates = gates.mul(Scalars.Of(_o.RouteScale));
        return new Routing(indices.MoveToOuterDisposeScope(), gates.MoveToOuterDisposeScope(), scores.MoveToOuterDisposeScope());
    }

    /// <summary>
    /// Aux-loss-free balancing step: b_i += gamma * sign(mean load - load_i), with the loads of one whole
    /// training step (every micro-batch and every data-parallel replica).
    /// </summary>
    public void UpdateBias(ReadOnlySpan<long> load, double gamma)
    {
        if (gamma == 0) return;
        double mean = 0;
        foreach (var l in load) mean += l;
        mean /= load.Length;
        var delta = new float[load.Length];
        for (int i = 0; i < load.Length; i++) delta[i] = (float)(gamma * Math.Sign(mean - load[i]));
        using (no_grad())
        using (var d = tensor(delta, device: expert_bias.device))
            expert_bias.add_(d, Scalars.One);
    }
}

/// <summary>Runs routed experts on token batches grouped by expert: the middle step of an MoE layer.</summary>
public interface IExpertExecutor
{
    /// <summary>
    /// <paramref name="tokens"/> [M, d] holds counts[0] rows for expert 0, then counts[1] for expert 1, …
    /// Returns outputs [M, d] in the same order, connected to autograd.
    /// </summary>
    Tensor Run(MoELayer layer, Tensor tokens, long[] counts);
}

/// <summary>Runs every expert in this process: the default, and the single-process reference.</summary>
public sealed class LocalExpertExecutor : IExpertExecutor
{
    public static readonly LocalExpertExecutor Instance = new();

    public Tensor Run(MoELayer layer, Tensor tokens, long[] counts)
        => layer.RunExperts(layer.AllExperts, tokens, counts);
}

/// <summary>How <see cref="MoELayer.RunExperts"/> computes routed experts.</summary>
internal enum ExpertKernel
{
    /// <summary>
    /// The default: on a CPU, every expert's rows in chunks computed side by side on single-threaded workers
    /// (<see cref="SwiGLUChunks"/>), the shared expert among them; on an accelerator (or a CPU libtorch without MKL,
    /// or another dtype than float and double), <see cref="Grouped"/>.
    /// </summary>
    Chunked,
    /// <summary>Batched matmuls over groups of experts chosen by a cost model (<see cref="MoELayer.PlanGroups"/>): the accelerator kernel.</summary>
    Grouped,
    /// <summary>One batched matmul per projection over every expert with tokens, padded to the largest count.</summary>
    Padded,
    /// <summary>One small SwiGLU call per expert: the reference the grouped path is checked against.</summary>
    Loop,
}

/// <summary>
/// DeepSeek-style MoE FFN: shared experts on every token plus fine-grained routed experts, top-k each.
/// The forward pass is three separable steps — dispatch, expert FFN, combine — so that the middle one
/// can run in expert-shard actors elsewhere (see <see cref="IExpertExecutor"/>).
/// </summary>
public sealed class MoELayer : nn.Module<Tensor, Tensor>
{
    private readonly Router router;
    private readonly SwiGLU? shared;
    private readonly ModuleList<SwiGLU> experts;
    private readonly MoEOptions _o;
    private long[] _stepCounts;

    public MoELayer(int layerIndex, int dim, MoEOptions options) : base(nameof(MoELayer))
    {
        LayerIndex = layerIndex;
        _o = options;
        router = new Router(dim, options);
        // Shared experts are always active, so they fuse into one SwiGLU of their combined width.
        shared = options.SharedExperts > 0 ? new SwiGLU(dim, options.SharedExperts * options.ExpertHidden) : null;
        experts = new ModuleList<SwiGLU>(Enumerable.Range(0, options.RoutedExperts).Select(_ => new SwiGLU(dim, options.ExpertHidden)).ToArray());
        _stepCounts = new long[options.RoutedExperts];
        AllExperts = [.. Enumerable.Range(0, options.RoutedExperts)];
        RegisterComponents();
    }

    public int LayerIndex { get; }
    public Router Router => router;
    public ModuleList<SwiGLU> Experts => experts;
    public MoEOptions Options => _o;

    /// <summary>Where the routed experts run. Local by default; the distributed runtime swaps in its own.</summary>
    public IExpertExecutor Executor { get; set; } = LocalExpertExecutor.Instance;

    /// <summary>Sequence-wise balance loss of the last forward (a zero scalar when alpha = 0).</summary>
    public Tensor? LastAuxLoss { get; private set; }

    /// <summary>Sum of the sequence-wise balance losses of <paramref name="layers"/>' last forwards, or null when none has one.</summary>
    public static Tensor? SumAuxLoss(IEnumerable<MoELayer> layers)
    {
        Tensor? total = null;
        // alias(): a handle of our own, since a layer disposes its LastAuxLoss on its next forward.
        foreach (var l in layers)
            if (l.LastAuxLoss is { } a) total = total is null ? a.alias() : total.Plus(a);
        return total;
    }

    /// <summary>Tokens each expert received since the last <see cref="TakeStepCounts"/>.</summary>
    public long[] PeekStepCounts() => (long[])_stepCounts.Clone();

    /// <summary>Returns and resets the per-expert token counts accumulated over a step's micro-batches.</summary>
    public long[] TakeStepCounts()
    {
        var c = _stepCounts;
        _stepCounts = new long[_o.RoutedExperts];
        return c;
    }

    /// <summary>
    /// How <see cref="RunExperts"/> computes the routed experts: chunked (the default; grouped on an accelerator),
    /// or the bmm kernels and the per-expert loop, kept as references for the equality tests and the benchmark.
    /// </summary>
    internal ExpertKernel Kernel { get; set; } = ExpertKernel.Chunked;

    // The chunked kernel is a CPU kernel (on an accelerator one launch per chunk would waste it) on MKL, in float or double.
    private bool Chunked(Tensor rows) => Kernel == ExpertKernel.Chunked && SwiGLUChunks.Serves(rows);

    /// <summary>
    /// Runs <paramref name="experts"/>[i] on the next <paramref name="counts"/>[i] rows of
    /// <paramref name="rows"/> and concatenates the outputs in the same order. Every place that executes
    /// routed experts (in-process, in a shard, in a stage's private path) goes through here.
    /// </summary>
    public Tensor RunExperts(IReadOnlyList<int> experts, Tensor rows, IReadOnlyList<long> counts)
    {
        using var scope = NewDisposeScope();
        var result = Chunked(rows) ? RunChunked(experts, rows, counts, null)[0]
            : Kernel == ExpertKernel.Loop ? RunLoop(experts, rows, counts)
            : RunGrouped(experts, rows, counts, onePaddedGroup: Kernel == ExpertKernel.Padded);
        return (result ?? NoExpertRan(rows)).MoveToOuterDisposeScope();
    }

    // No expert ran (every count zero): zeros shaped like the rows, still attached to them so that a
    // shard's backward through its output works when it was sent no tokens. A multiply, not zeros_like,
    // for that link; by the cached Scalar, not the literal 0, which would be an implicit Scalar (Scalars).
    private static Tensor NoExpertRan(Tensor rows) => rows.mul(Scalars.Zero);

    /// <summary>Every routed expert's index, 0 … E − 1: the experts a layer runs when all of them are local.</summary>
    internal int[] AllExperts { get; }

    /// <summary>
    /// The chunked kernel on routed rows, and with <paramref name="sharedRows"/> the shared expert in the same
    /// call (its chunks run beside the routed ones). Returns [routed output or null when no row was routed,
    /// shared output].
    /// </summary>
    private Tensor?[] RunChunked(IReadOnlyList<int> experts, Tensor? rows, IReadOnlyList<long>? counts, Tensor? sharedRows)
    {
        var inputs = new List<Tensor>(2);
        var segments = new List<SwiGLUSegment>(experts.Count + 1);
        bool routed = rows is not null && counts!.Any(c => c > 0);
        if (routed)
        {
            inputs.Add(rows!);
            long offset = 0;
            for (int i = 0; i < experts.Count; i++)
            {
                segments.Add(new SwiGLUSegment(this.experts[experts[i]], 0, offset, counts![i]));
                offset += counts[i];
            }
        }
        if (sharedRows is not null)
        {
            segments.Add(new SwiGLUSegment(shared!, inputs.Count, 0, sharedRows.shape[0]));
            inputs.Add(sharedRows);
        }
        if (inputs.Count == 0) return [null, null];
        var outputs = SwiGLUChunks.Run(inputs, segments);
        return routed ? [outputs[0], sharedRows is null ? null : outputs[1]] : [null, outputs[0]];
    }

    // The reference: one SwiGLU call per expert on its narrow of the rows, outputs concatenated.
    private Tensor? RunLoop(IReadOnlyList<int> experts, Tensor rows, IReadOnlyList<long> counts)
    {
        var outputs = new List<Tensor>(experts.Count);
        long offset = 0;
        for (int i = 0; i < experts.Count; i++)
        {
            if (counts[i] == 0) continue;
            outputs.Add(this.experts[experts[i]].forward(rows.narrow(0, offset, counts[i])));
            offset += counts[i];
        }
        return outputs.Count == 0 ? null : cat(outputs, 0);
    }

    /// <summary>
    /// Routed experts as batched SwiGLUs. The experts (in the given order) are cut into groups of adjacent
    /// ones (<see cref="PlanGroups"/>); a group's rows, padded with zero rows to its largest count, form
    /// a batch [g, cap, d], and one bmm computes the gate and up projections of all its experts, one the
    /// down projection. Weights are stacked per call from each expert's own parameters, so gradients flow
    /// to them and an expert stays a unit of its own. Padding rows compute on zeros, are never read back
    /// and get zero gradient. A group of one expert is a plain SwiGLU call on its rows.
    /// </summary>
    /// <remarks>
    /// Groups rather than one block padded to the largest count: early in training (and whenever the
    /// balancing lags) one expert can take half the rows, and padding every expert to it would multiply
    /// the FLOPs. Deterministic: the groups are a
    /// function of the counts, bmm is a fixed sequence of GEMMs, and the index ops write each slot once
    /// (index_copy; index_select, whose backward adds into distinct rows).
    /// </remarks>
    private Tensor? RunGrouped(IReadOnlyList<int> experts, Tensor rows, IReadOnlyList<long> counts, bool onePaddedGroup)
    {
        var active = new List<int>(experts.Count);
        var activeCounts = new List<long>(experts.Count);
        for (int i = 0; i < experts.Count; i++)
        {
            if (counts[i] == 0) continue;
            active.Add(i);
            activeCounts.Add(counts[i]);
        }
        if (active.Count == 0) return null;
        long d = rows.shape[1];
        var groups = onePaddedGroup ? [(0, active.Count)] : PlanGroups(activeCounts, PlanForAccelerator ?? rows.device.type == DeviceType.CUDA);
        var parts = rows.split(groups.Select(grp => activeCounts.Skip(grp.From).Take(grp.To - grp.From).Sum()).ToArray());
        var outputs = new Tensor[groups.Count];
        for (int k = 0; k < groups.Count; k++)
        {
            var (from, to) = groups[k];
            var ffn = active.Skip(from).Take(to - from).Select(i => this.experts[experts[i]]).ToArray();
            if (ffn.Length == 1 && !onePaddedGroup)
            {
                outputs[k] = ffn[0].forward(parts[k]);
                continue;
            }
            long g = ffn.Length, cap = activeCounts.Skip(from).Take(to - from).Max(), total = parts[k].shape[0];
            // Slot of each row in the padded layout: j * cap + r for the r-th row of the group's j-th expert.
            Tensor? slots = null;
            Tensor block;
            if (g * cap == total)
                block = parts[k].reshape(g, cap, d);
            else
            {
                var slot = new long[total];
                long o = 0;
                for (int j = 0; j < g; j++)
                    for (long r = 0; r < activeCounts[from + j]; r++)
                        slot[o++] = j * cap + r;
                slots = tensor(slot, device: rows.device);
                block = zeros(g * cap, d, dtype: rows.dtype, device: rows.device).index_copy(0, slots, parts[k]).view(g, cap, d);
            }
            long h = ffn[0].W1.shape[0];
            var gateUp = cat([stack(ffn.Select(f => f.W1)), stack(ffn.Select(f => f.W3))], 1); // [g, 2h, d]
            var down = stack(ffn.Select(f => f.W2));                                            // [g, d, h]
            var up = block.bmm(gateUp.transpose(1, 2));                                         // [g, cap, 2h]
            var hidden = nn.functional.silu(up.narrow(2, 0, h)) * up.narrow(2, h, h);
            var y = hidden.bmm(down.transpose(1, 2)).view(g * cap, d);                          // [g * cap, d]
            outputs[k] = slots is null ? y : y.index_select(0, slots);
        }
        return outputs.Length == 1 ? outputs[0] : cat(outputs, 0);
    }

    /// <summary>Tests: plan groups as on an accelerator (true) or a CPU (false) whatever the device; null = by the device.</summary>
    internal bool? PlanForAccelerator { get; set; }

    /// <summary>
    /// Cuts experts with these (non-zero) counts, in order, into groups [From, To) of adjacent experts.
    /// On a CPU every expert is a group of its own. On an accelerator the cut minimises an estimate of
    /// the cost in rows: per group, its experts times its largest count plus <see cref="AcceleratorGroupCostRows"/>
    /// for the group's calls (exact, by dynamic programming over the cut points).
    /// </summary>
    /// <remarks>
    /// Why alone on a CPU: there the expert GEMMs are compute-bound, so batching them saves only the calls
    /// (measured on the default model, 2-core VM: at best 5–10 % of the routed experts' time when counts are
    /// equal, and padding costs more than it saves when they are not), and it costs the cluster its
    /// equivalence: a group's bits depend on which experts share it, so an expert alone in a shard and the
    /// same expert batched with others in the single process round differently, and 47 steps drift past
    /// the 1e-4 the equivalence tests allow (2 nodes, DP=2: gradient norm off by 1.3e-4). Alone, an
    /// expert's result depends only on its own rows, whatever the layout.
    /// </remarks>
    /// <param name="accelerator">a GPU, where a kernel launch costs far more than a padded row.</param>
    internal static List<(int From, int To)> PlanGroups(IReadOnlyList<long> counts, bool accelerator = false)
    {
        if (!accelerator) return [.. Enumerable.Range(0, counts.Count).Select(i => (i, i + 1))];
        double perGroup = AcceleratorGroupCostRows;
        int n = counts.Count;
        var best = new double[n + 1];
        var cut = new int[n + 1];
        for (int i = 1; i <= n; i++)
        {
            best[i] = double.MaxValue;
            long max = 0;
            for (int j = i - 1; j >= 0; j--)
            {
                max = Math.Max(max, counts[j]);
                long rows = (i - j) * max;
                double cost = best[j] + rows + perGroup;
                if (cost < best[i]) (best[i], cut[i]) = (cost, j);
            }
        }
        var groups = new List<(int From, int To)>();
        for (int i = n; i > 0; i = cut[i]) groups.Add((cut[i], i));
        groups.Reverse();
        return groups;
    }

    /// <summary>An accelerator's cost of one group's calls (launches, stacking), in rows of expert work: a guess, not measured here.</summary>
    internal const double AcceleratorGroupCostRows = 4096;

    /// <summary>Capacity per expert for N tokens, or null when no token is ever dropped.</summary>
    public long? Capacity(long tokens) =>
        _o.CapacityFactor > 0 ? (long)Math.Ceiling(_o.CapacityFactor * tokens * _o.TopK / _o.RoutedExperts) : null;

    /// <summary>x: [B, T, d] → [B, T, d].</summary>
    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        long b = x.shape[0], t = x.shape[1], d = x.shape[2];
        var flat = x.reshape(b * t, d);
        var routing = router.forward(flat);
        using var plan = DispatchPlan.Create(routing.Indices, _o.RoutedExperts, Capacity(b * t));
        for (int e = 0; e < _stepCounts.Length; e++) _stepCounts[e] += plan.Counts[e];

        Tensor expertOut;
        Tensor? sharedOut = null;
        if (Executor is LocalExpertExecutor && Chunked(flat))
        {
            // All in one call of the chunked kernel, so the shared expert's chunks fill the cores beside the routed ones.
            var rows = plan.Dispatch(flat);
            var outs = RunChunked(AllExperts, rows, plan.Counts, shared is null ? null : flat);
            (expertOut, sharedOut) = (outs[0] ?? NoExpertRan(rows), outs[1]);
        }
        else
        {
            expertOut = Executor.Run(this, plan.Dispatch(flat), plan.Counts);
            // The shared expert through the same kernel as in the single process, so its bits do not depend on
            // where the routed experts ran.
            if (shared is not null) sharedOut = Chunked(flat) ? RunChunked([], null, null, flat)[1] : shared.forward(flat);
        }
        var y = plan.Combine(expertOut, routing.Gates, b * t, sharedOut);

        LastAuxLoss?.Dispose();
        LastAuxLoss = _o.SequenceAuxAlpha > 0
            ? SequenceBalanceLoss(routing, b, t).MoveToOuterDisposeScope()
            : null;
        return y.reshape(b, t, d).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Reference path: every expert on every token, mixed by a dense gate matrix. Same maths as
    /// <see cref="forward"/> without dispatch or capacity; tests compare the two.
    /// </summary>
    public Tensor ForwardDense(Tensor x)
    {
        using var scope = NewDisposeScope();
        long b = x.shape[0], t = x.shape[1], d = x.shape[2];
        var flat = x.reshape(b * t, d);
        var routing = router.forward(flat);
        var gateMatrix = zeros(b * t, _o.RoutedExperts, dtype: flat.dtype, device: flat.device).scatter(1, routing.Indices, routing.Gates);
        var y = zeros_like(flat);
        for (int e = 0; e < _o.RoutedExperts; e++)
            y = y.Plus(gateMatrix.narrow(1, e, 1) * experts[e].forward(flat));
        if (shared is not null) y = y.Plus(shared.forward(flat));
        return y.reshape(b, t, d).MoveToOuterDisposeScope();
    }

    // DeepSeek-V3 complementary sequence-wise loss: alpha * sum_i f_i * P_i per sequence, averaged.
    private Tensor SequenceBalanceLoss(Routing routing, long b, long t)
    {
        int e = _o.RoutedExperts, k = _o.TopK;
        var s = routing.Scores.reshape(b, t, e);
        var p = (s / s.sum(-1, keepdim: true)).mean(new long[] { 1 });                 // [B, E]
        var chosen = nn.functional.one_hot(routing.Indices.reshape(b, t * k), e).sum(1).to(s.dtype); // [B, E]
        using var scale = ((double)e / (k * t)).ToScalar();
        var f = chosen.mul(scale);
        return (f.detach() * p).sum(-1).mean().mul(Scalars.Of(_o.SequenceAuxAlpha));
    }
}
