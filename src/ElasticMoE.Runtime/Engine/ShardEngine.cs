using ElasticMoE.Model;
using ElasticMoE.Runtime.DataPlane;
using ElasticMoE.Runtime.Protocol;
using ElasticMoE.State;
using ElasticMoE.Training;
using static TorchSharp.torch;

namespace ElasticMoE.Runtime.Engine;

/// <summary>
/// The routed experts of one MoE layer that other workers call, placed on this worker by the current
/// plan. Receives dispatched tokens, runs the experts, returns outputs; on the backward request runs
/// <c>backward(grad)</c> on the kept graph and returns the input gradients.
/// </summary>
/// <remarks>
/// Reproducible reductions: requests from several requesters arrive in whatever order the network
/// delivers them, and float sums depend on order. So each backward's parameter gradients are kept apart,
/// per micro-batch, and summed in ascending micro-batch order (the single-process loop's order) only when
/// every contribution is in — before the norm or the update. Same seed, config and layout → same bits.
/// </remarks>
public sealed class ShardEngine : IDisposable
{
    private readonly WorkerContext _ctx;
    private readonly MoELayer _layer;
    private readonly int[] _experts;
    private readonly List<StateUnit> _units;
    private readonly List<(string Name, Tensor Param)> _params;
    // Experts whose gradients go to this worker's buddy each step (redundancy), in the order it expects.
    private readonly List<StateUnit> _mirrored;
    private readonly AdamW _optimizer;
    private readonly Dictionary<(int Requester, int MicroBatch), (Tensor Input, Tensor Output)> _graphs = new();
    // Per micro-batch, the gradient of each parameter (null where that call did not touch it).
    private readonly SortedDictionary<int, Tensor?[]> _contributions = new();
    private Fence _computeFence = new(-1, -1, -1);
    private bool _accumulated;

    public ShardEngine(WorkerContext ctx, int moeOrdinal)
    {
        _ctx = ctx;
        MoEOrdinal = moeOrdinal;
        _layer = ctx.Model.Blocks[moeOrdinal + ctx.Config.Model.DenseLayers].MoE
                 ?? throw new InvalidOperationException($"block {moeOrdinal + ctx.Config.Model.DenseLayers} is not an MoE layer");
        _experts = ctx.ActivePlan.ExpertsOn(moeOrdinal, ctx.Worker);
        _units = ctx.ExpertUnits(moeOrdinal);
        _params = WorkerContext.ParametersOf(_units);
        _mirrored = MirrorParts.Of(ctx.ActivePlan, ctx.Worker, ctx.Config.Model).GetValueOrDefault(1 + moeOrdinal, []).Select(u => ctx.Units[u]).ToList();
        var t = ctx.Config.Train;
        _optimizer = new AdamW(t.Beta1, t.Beta2, t.AdamEps, t.WeightDecay);
    }

    public int MoEOrdinal { get; }
    public IReadOnlyList<int> Experts => _experts;
    public IReadOnlyList<(string Name, Tensor Param)> Parameters => _params;
    public int PendingGraphs => _graphs.Count;

    public void Forward(ExpertForward req, CancellationToken token)
    {
        if (req.Counts.Length != _experts.Length)
            throw new InvalidOperationException($"shard L{MoEOrdinal}@{_ctx.Worker} hosts {_experts.Length} experts but got counts for {req.Counts.Length}");
        if (req.Train) EnterCompute(req.Fence);
        _ctx.MaybeInject(FaultPhase.Dispatch, req.Fence);
        // Intermediate handles die with the scope; the graph itself is held by libtorch through the
        // output, which (with its input) is kept until the matching backward request.
        using var scope = NewDisposeScope();
        using var frame = Receive(req.DataTag, token);
        var x = frame.ToTensor().to(_ctx.Device);
        Tensor output;
        if (req.Train)
        {
            x.requires_grad_(true);
            output = RunExperts(x, req.Counts);
        }
        else
        {
            using var _ = no_grad();
            output = RunExperts(x, req.Counts);
        }
        Send(req.ReplyEndpoint, req.ReplyTag, output.detach(), token);
        if (req.Train)
            _graphs[(req.Requester, req.MicroBatch)] = (x.DetachFromDisposeScope(), output.DetachFromDisposeScope());
    }

    public void Backward(ExpertBackward req, CancellationToken token)
    {
        if (req.Fence != _computeFence || !_graphs.Remove((req.Requester, req.MicroBatch), out var saved))
            throw new InvalidOperationException($"shard L{MoEOrdinal}@{_ctx.Worker}: backward for {req.Fence} worker {req.Requester} micro-batch {req.MicroBatch} without its forward");
        using var scope = NewDisposeScope();
        using var input = saved.Input;
        using var output = saved.Output;
        using var frame = Receive(req.DataTag, token);
        var grad = frame.ToTensor().to(_ctx.Device);
        foreach (var (_, p) in _params) p.grad = null;
        output.backward(new[] { grad });
        // Keep this call's parameter gradients apart (see the class remarks) and leave .grad empty.
        var parts = new Tensor?[_params.Count];
        for (int i = 0; i < _params.Count; i++)
        {
            var p = _params[i].Param;
            if (p.grad is { } g) parts[i] = g.detach().DetachFromDisposeScope();
            p.grad = null;
        }
        if (_contributions.Remove(req.MicroBatch, out var old)) Dispose(old);
        _contributions[req.MicroBatch] = parts;
        Send(req.ReplyEndpoint, req.ReplyTag, input.grad!, token);
    }

    /// <summary>Squared norm of this shard's gradients for compute attempt <paramref name="fence"/>.</summary>
    public double GradSumSq(Fence fence, CancellationToken token)
    {
        _ctx.MaybeInject(FaultPhase.Norm, fence);
        Accumulate(fence);
        // The gradients are final now: the buddy gets them before the norm is reported (see MirrorParts).
        MirrorSender.Send(_ctx, fence, token, 1 + MoEOrdinal, _mirrored);
        return GradClip.SumOfSquares(_params.Select(p => p.Param));
    }

    /// <summary>Applies the step to every unit that has not yet; returns (applied now, applied before).</summary>
    public (int Applied, int Already) Apply(ApplyUpdate u)
    {
        Accumulate(u.Fence with { Attempt = u.ComputeAttempt });
        using var scope = NewDisposeScope();
        int applied = 0, already = 0;
        foreach (var unit in _units)
        {
            if (_optimizer.StepUnit(unit, u.Fence.Step, u.Lr, u.ClipScale)) applied++;
            else already++;
        }
        // None, not zero, like Module.zero_grad(): an expert that gets no token in a step has no gradient
        // and AdamW leaves it alone, exactly as in the single-process loop.
        foreach (var (_, p) in _params) p.grad = null;
        DropGraphs();
        return (applied, already);
    }

    // A forward of a newer compute attempt: whatever an older one left (graphs, contributions) is void.
    private void EnterCompute(Fence fence)
    {
        if (fence == _computeFence) return;
        DropGraphs();
        ClearContributions();
        foreach (var (_, p) in _params) p.grad = null;
        _computeFence = fence;
        _accumulated = false;
    }

    // Sums the contributions of compute attempt `fence` into .grad, in ascending micro-batch order. A
    // shard that got no token in that attempt (or only in another one) has no gradient.
    private void Accumulate(Fence fence)
    {
        if (fence != _computeFence)
        {
            EnterCompute(fence);
            _accumulated = true;
            return;
        }
        if (_accumulated) return;
        _accumulated = true;
        using var _ = no_grad();
        for (int i = 0; i < _params.Count; i++)
        {
            Tensor? sum = null;
            foreach (var parts in _contributions.Values)
            {
                if (parts[i] is not { } g) continue;
                if (sum is null) sum = g.clone();
                else sum.add_(g, Scalars.One);
            }
            _params[i].Param.grad = sum;
            sum?.Dispose();   // the parameter holds its own reference
        }
        ClearContributions();
    }

    private void ClearContributions()
    {
        foreach (var parts in _contributions.Values) Dispose(parts);
        _contributions.Clear();
    }

    private static void Dispose(Tensor?[] parts)
    {
        foreach (var t in parts) t?.Dispose();
    }

    /// <summary>Forgets graphs of an abandoned attempt (never needed in a clean run: each forward meets its backward).</summary>
    public void DropGraphs()
    {
        foreach (var (input, output) in _graphs.Values)
        {
            input.Dispose();
            output.Dispose();
        }
        _graphs.Clear();
    }

    private Tensor RunExperts(Tensor x, long[] counts) => _layer.RunExperts(_experts, x, counts);

    private Frame Receive(long tag, CancellationToken token)
    {
        var task = _ctx.DataPlane.ReceiveAsync(tag, token);
        _ctx.Wait(task, token, $"shard L{MoEOrdinal}: tokens under tag {tag:X}");
        return task.Result;
    }

    private void Send(string endpoint, long tag, Tensor value, CancellationToken token)
        => _ctx.Wait(_ctx.DataPlane.SendAsync(endpoint, tag, value.contiguous()), token, $"shard L{MoEOrdinal}: reply to {endpoint}");

    public void Dispose()
    {
        DropGraphs();
        ClearContributions();
        foreach (var (_, p) in _params) p.grad = null;
    }
}
