using static TorchSharp.torch;

namespace ElasticMoE.Model;

/// <summary>
/// Assignments of tokens to experts, grouped by expert: the "dispatch" step, and its inverse, "combine".
/// No parameters, so the same plan drives local experts or expert shards on other nodes.
/// </summary>
/// <remarks>
/// Both directions are gathers, forward and backward: every assignment knows its row in the grouped layout
/// (<see cref="Position"/>) and every row its token (<see cref="TokenIndex"/>), so no step scatters with
/// index_add. A gather writes each output row once, so the result is deterministic and the work splits
/// cleanly; and the plan itself is a counting sort in C# over the N·k chosen experts (microseconds), where
/// argsort, bincount and the index ops cost ~0.4 ms per layer and micro-batch (2-core VM).
/// </remarks>
public sealed class DispatchPlan : IDisposable
{
    /// <summary>[M] token row of each kept assignment, grouped by expert (ascending expert id, then token order).</summary>
    public Tensor TokenIndex { get; }
    /// <summary>[M] flat index (token * k + slot) of each kept assignment, to pick its gate.</summary>
    public Tensor AssignmentIndex { get; }
    /// <summary>[N * k] row of each assignment in the grouped layout, or M (a zero row) for one dropped by the capacity limit.</summary>
    public Tensor Position { get; }
    /// <summary>Tokens kept per expert; sums to M.</summary>
    public long[] Counts { get; }
    /// <summary>Assignments dropped by the capacity limit (0 unless a capacity factor is set).</summary>
    public long Dropped { get; }
    /// <summary>N: tokens routed.</summary>
    public long Tokens { get; }
    /// <summary>k: experts per token.</summary>
    public int K { get; }

    private DispatchPlan(Tensor tokenIndex, Tensor assignmentIndex, Tensor position, long[] counts, long dropped, long tokens, int k)
    {
        TokenIndex = tokenIndex;
        AssignmentIndex = assignmentIndex;
        Position = position;
        Counts = counts;
        Dropped = dropped;
        Tokens = tokens;
        K = k;
    }

    /// <param name="indices">[N, k] chosen experts.</param>
    /// <param name="experts">number of routed experts.</param>
    /// <param name="capacity">max tokens per expert, or null for no limit (an expert keeps its first assignments).</param>
    public static DispatchPlan Create(Tensor indices, int experts, long? capacity)
    {
        long n = indices.shape[0];
        int k = (int)indices.shape[1];
        // Read and written in place (no managed copies: a plan per layer and micro-batch made ~80 KB of garbage).
        using var flat = indices.reshape(-1).to(ScalarType.Int64, CPU).contiguous();
        var chosen = Native.TensorMemory.Span<long>(flat);
        var counts = new long[experts];
        foreach (var e in chosen)
        {
            if ((ulong)e >= (ulong)experts) throw new ArgumentException($"expert index {e} outside 0..{experts - 1}", nameof(indices));
            counts[e]++;
        }
        long dropped = 0, m = 0;
        var offsets = new long[experts];
        for (int e = 0; e < experts; e++)
        {
            long kept = capacity is long cap ? Math.Min(counts[e], cap) : counts[e];
            dropped += counts[e] - kept;
            counts[e] = kept;
            offsets[e] = m;
            m += kept;
        }
        var tokenT = empty(m, dtype: ScalarType.Int64);
        var assignmentT = empty(m, dtype: ScalarType.Int64);
        var positionT = empty(chosen.Length, dtype: ScalarType.Int64);
        var token = Native.TensorMemory.Span<long>(tokenT);
        var assignment = Native.TensorMemory.Span<long>(assignmentT);
        var position = Native.TensorMemory.Span<long>(positionT);
        var filled = new long[experts];
        for (int a = 0; a < chosen.Length; a++)
        {
            long e = chosen[a];
            if (filled[e] < counts[e])
            {
                long p = offsets[e] + filled[e]++;
                token[(int)p] = a / k;
                assignment[(int)p] = a;
                position[a] = p;
            }
            else position[a] = m;
        }
        var device = indices.device;
        if (device.type == TorchSharp.DeviceType.CPU) return new DispatchPlan(tokenT, assignmentT, positionT, counts, dropped, n, k);
        using (tokenT) using (assignmentT) using (positionT)
            return new DispatchPlan(tokenT.to(device), assignmentT.to(device), positionT.to(device), counts, dropped, n, k);
    }

    /// <summary>Rows of x [N, d] for every kept assignment, grouped by expert: [M, d].</summary>
    public Tensor Dispatch(Tensor x) => DispatchRows.apply(x, this)[0];

    /// <summary>
    /// Gate-weighted sum of expert outputs [M, d] back to token rows [N, d]: the "combine" step, with the shared
    /// experts' output [N, d] added when given. A token's assignments add up in slot order (its top-k order), then
    /// the shared output.
    /// </summary>
    public Tensor Combine(Tensor expertOutputs, Tensor gates, long tokens, Tensor? shared = null)
    {
        if (tokens != Tokens) throw new ArgumentException($"the plan routed {Tokens} tokens, not {tokens}", nameof(tokens));
        using var g = gates.to(expertOutputs.dtype);
        return (shared is null ? CombineRows.apply(expertOutputs, g, this) : CombineRows.apply(expertOutputs, g, this, shared))[0];
    }

    public void Dispose()
    {
        TokenIndex.Dispose();
        AssignmentIndex.Dispose();
        Position.Dispose();
    }

    // x [N, d] → rows [M, d]; backward: each token sums its assignments' row gradients (a gather, not index_add).
    private sealed class DispatchRows : autograd.MultiTensorFunction<DispatchRows>
    {
        public override string Name => nameof(DispatchRows);

        public override List<Tensor> forward(autograd.AutogradContext ctx, params object[] vars)
        {
            var (x, plan) = ((Tensor)vars[0], (DispatchPlan)vars[1]);
            ctx.save_data(nameof(DispatchPlan), plan.Shape());
            ctx.save_for_backward([plan.Position]);
            return [x.index_select(0, plan.TokenIndex)];
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, List<Tensor> grads)
        {
            var shape = (PlanShape)ctx.get_data(nameof(DispatchPlan));
            using var scope = NewDisposeScope();
            var position = ctx.get_saved_variables()[0];
            var dRows = grads[0].contiguous();
            Tensor dx;
            if (RowKernels.Serve(dRows))
            {
                dx = empty(shape.Tokens, dRows.shape[1], dtype: dRows.dtype, device: dRows.device);
                RowKernels.GatherSum(dRows, position, dx);
            }
            else dx = shape.PerAssignment(dRows, position).sum(1);
            return [dx.MoveToOuterDisposeScope(), null!];
        }
    }

    // (rows [M, d], gates [N, k] (, shared [N, d])) → y [N, d] = Σ_slot gate · row (+ shared); backward: gathers again.
    private sealed class CombineRows : autograd.MultiTensorFunction<CombineRows>
    {
        public override string Name => nameof(CombineRows);

        public override List<Tensor> forward(autograd.AutogradContext ctx, params object[] vars)
        {
            var (rows, gates, plan) = (((Tensor)vars[0]).contiguous(), ((Tensor)vars[1]).contiguous(), (DispatchPlan)vars[2]);
            var shared = vars.Length > 3 ? ((Tensor)vars[3]).contiguous() : null;
            ctx.save_data(nameof(DispatchPlan), plan.Shape());
            ctx.save_data(nameof(shared), shared is not null);
            ctx.save_for_backward([rows, gates, plan.Position, plan.TokenIndex, plan.AssignmentIndex]);
            if (RowKernels.Serve(rows, gates, shared))
            {
                var y = empty(plan.Tokens, rows.shape[1], dtype: rows.dtype, device: rows.device);
                RowKernels.Combine(rows, gates, plan.Position, shared, y);
                return [y];
            }
            using var scope = NewDisposeScope();
            var combined = plan.Shape().PerAssignment(rows, plan.Position).mul(gates.unsqueeze(-1)).sum(1);
            return [(shared is null ? combined : combined.Plus(shared)).MoveToOuterDisposeScope()];
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, List<Tensor> grads)
        {
            var shape = (PlanShape)ctx.get_data(nameof(DispatchPlan));
            bool hasShared = (bool)ctx.get_data("shared");
            using var scope = NewDisposeScope();
            var saved = ctx.get_saved_variables();
            var (rows, gates, position, token, assignment) = (saved[0], saved[1], saved[2], saved[3], saved[4]);
            var dy = grads[0].contiguous();
            Tensor dRows, dGates;
            if (RowKernels.Serve(rows, gates, dy))
            {
                dRows = empty_like(rows);
                dGates = empty_like(gates);
                RowKernels.CombineBackward(rows, gates, position, token, assignment, dy, dRows, dGates);
            }
            else
            {
                dGates = shape.PerAssignment(rows, position).mul(dy.unsqueeze(1)).sum(-1);                          // [N, k]
                dRows = dy.index_select(0, token).mul(gates.reshape(-1).index_select(0, assignment).unsqueeze(1)); // [M, d]
            }
            var result = new List<Tensor> { dRows.MoveToOuterDisposeScope(), dGates.MoveToOuterDisposeScope(), null! };
            if (hasShared) result.Add(dy.alias().MoveToOuterDisposeScope());
            return result;
        }
    }

    private PlanShape Shape() => new(Tokens, K, Dropped);

    // What a backward needs of the plan besides its index tensors (which the node saves: the plan is disposed
    // when the layer's forward returns).
    private sealed record PlanShape(long Tokens, int K, long Dropped)
    {
        // Rows [M, d] gathered per assignment [N, k, d]: a dropped assignment reads a zero row.
        public Tensor PerAssignment(Tensor rows, Tensor position)
        {
            using var scope = NewDisposeScope();
            var source = Dropped == 0 ? rows : cat([rows, zeros(1, rows.shape[1], dtype: rows.dtype, device: rows.device)], 0);
            return source.index_select(0, position).view(Tokens, K, rows.shape[1]).MoveToOuterDisposeScope();
        }
    }
}
