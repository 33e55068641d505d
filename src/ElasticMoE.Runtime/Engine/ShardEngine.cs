using ElasticMoE.Model;
using ElasticMoE.Planning;
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
/// per micro-batch, and summed in the canonical tree over micro-batches (<see cref="ReductionTree"/>, the
/// single-process loop's order) only when every contribution is in — before the norm or the update.
/// <para>
/// Replicated experts (<see cref="TrainingPlan.Copies"/>): copy i computed every row of the micro-batches of
/// its share (<see cref="TrainingPlan.CopyFor"/>), so it holds the tree's partials over that share. Once this
/// shard's own partials are done, the holders of each replicated expert swap them over the data plane (one frame
/// per pair of holders, fenced by the attempt) and each combines all of them up the tree: the same floats in the
/// same order everywhere, so every copy applies the same AdamW update and stays bit-identical, and equal to
/// the single copy's. The gradient norm counts such an expert once: only its copy 0's shard includes it.
/// </para>
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
    // Replicated experts held here: index into _units → the ranks of its copies, and which copy this is.
    private readonly Dictionary<int, (int[] Copies, int Mine)> _replicaOf = new();
    // Every other holder of a copy of something held here: rank → local indices of those experts, ascending.
    private readonly SortedDictionary<int, List<int>> _peers = new();
    // First index in _params of each unit's parameters (and one past the last).
    private readonly int[] _paramStart;
    // Each unit's parameters (the slice of _params).
    private readonly List<Tensor>[] _unitParams;
    // Parameters the norm counts: all but those of replicated experts whose copy 0 is elsewhere.
    private readonly List<(string Name, Tensor Param)> _normParams;
    // Replicated experts' partials over this copy's share of the micro-batches, until the copies swapped them.
    private readonly Dictionary<int, GradientTree> _replicaTrees = new();

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
        _paramStart = new int[_units.Count + 1];
        for (int k = 0; k < _units.Count; k++) _paramStart[k + 1] = _paramStart[k] + _units[k].Parameters.Count();
        _unitParams = Enumerable.Range(0, _units.Count)
            .Select(k => _params.Skip(_paramStart[k]).Take(_paramStart[k + 1] - _paramStart[k]).Select(p => p.Param).ToList()).ToArray();
        var plan = ctx.ActivePlan;
        var notCounted = new HashSet<int>();
        for (int k = 0; k < _experts.Length; k++)
        {
            var copies = plan.CopiesOf(moeOrdinal, _experts[k]);
            if (copies.Length < 2) continue;
            int mine = Array.IndexOf(copies, ctx.Worker);
            _replicaOf[k] = (copies, mine);
            if (mine != 0)
                for (int i = _paramStart[k]; i < _paramStart[k + 1]; i++) notCounted.Add(i);
            foreach (var peer in copies.Where(r => r != ctx.Worker))
            {
                if (!_peers.TryGetValue(peer, out var list)) _peers[peer] = list = new List<int>();
                list.Add(k);
            }
        }
        _normParams = _params.Where((_, i) => !notCounted.Contains(i)).ToList();
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

    /// <summary>The norm of this shard's gradients for compute attempt <paramref name="fence"/>: Σ g² per parameter name.</summary>
    public Dictionary<string, double> GradSumSq(Fence fence, CancellationToken token)
    {
        _ctx.MaybeInject(FaultPhase.Norm, fence);
        Accumulate(fence, token);
        // The gradients are final now: the buddy gets them before the norm is reported (see MirrorParts).
        MirrorSender.Send(_ctx, fence, token, 1 + MoEOrdinal, _mirrored);
        return GradClip.SumsOfSquares(_normParams);
    }

    /// <summary>Applies the step to every unit that has not yet; returns (applied now, applied before).</summary>
    public (int Applied, int Already) Apply(ApplyUpdate u, CancellationToken token)
    {
        Accumulate(u.Fence with { Attempt = u.ComputeAttempt }, token);
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

    // Sums the contributions of compute attempt `fence` into .grad in the canonical tree, then completes
    // replicated experts' gradients with their other copies' partials (see the class remarks). A shard that got
    // no token in that attempt (or only in another one) has no gradient of its own, but still swaps: the other
    // copies wait for its frame.
    private void Accumulate(Fence fence, CancellationToken token)
    {
        if (fence != _computeFence) EnterCompute(fence);
        else if (_accumulated) return;
        _accumulated = true;
        int leaves = _ctx.Config.Train.MicroBatchesPerStep;
        using (var _ = no_grad())
        {
            for (int k = 0; k < _units.Count; k++)
            {
                var (lo, hi) = _replicaOf.TryGetValue(k, out var r) ? TrainingPlan.CopyMicroBatches(r.Mine, r.Copies.Length, leaves) : (0, leaves);
                var tree = new GradientTree(_unitParams[k], leaves, lo, hi);
                for (int m = lo; m < hi; m++) tree.Put(m, TakeContribution(m, k));
                if (_replicaOf.ContainsKey(k)) _replicaTrees[k] = tree;
                else
                {
                    tree.InstallRoot();
                    tree.Dispose();   // the parameters hold their own references
                }
            }
        }
        ClearContributions();
        try
        {
            ExchangeReplicaGradients(fence, token);
        }
        finally
        {
            foreach (var tree in _replicaTrees.Values) tree.Dispose();
            _replicaTrees.Clear();
        }
    }

    // Unit k's gradients of micro-batch m (null: that call did not touch it), moved out of the contributions.
    private Tensor?[]? TakeContribution(int m, int k)
    {
        if (!_contributions.TryGetValue(m, out var parts)) return null;
        var mine = new Tensor?[_paramStart[k + 1] - _paramStart[k]];
        for (int j = 0; j < mine.Length; j++)
        {
            mine[j] = parts[_paramStart[k] + j];
            parts[_paramStart[k] + j] = null;
        }
        return mine;
    }

    private void ExchangeReplicaGradients(Fence fence, CancellationToken token)
    {
        if (_peers.Count == 0) return;
        var plan = _ctx.ActivePlan;
        int leaves = _ctx.Config.Train.MicroBatchesPerStep;
        var what = $"shard L{MoEOrdinal}@{_ctx.Worker}: replica gradients of {fence}";
        // What a holder sends for expert k: its partials (the cover of its share), each the unit's parameters.
        List<TreeNode> CoverOf(int k, int holder)
        {
            var copies = _replicaOf[k].Copies;
            var (lo, hi) = TrainingPlan.CopyMicroBatches(Array.IndexOf(copies, holder), copies.Length, leaves);
            return ReductionTree.Cover(lo, hi, leaves);
        }
        var receives = _peers.Keys.ToDictionary(peer => peer,
            peer => _ctx.DataPlane.ReceiveAsync(StepTags.Make(StepTags.Kind.ReplicaGradients, fence, MoEOrdinal, 0, peer, _ctx.Worker), token));
        var packs = new List<Tensor>();
        var theirs = new Dictionary<int, Dictionary<TreeNode, Tensor?[]?>>();
        try
        {
            var sends = new List<Task>();
            foreach (var (peer, locals) in _peers)
            {
                var grads = new List<(Tensor, Tensor?)>();
                foreach (int k in locals)
                {
                    var ps = _unitParams[k];
                    foreach (var (_, partial) in _replicaTrees[k].Partials)
                        for (int j = 0; j < ps.Count; j++) grads.Add((ps[j], partial?[j]));
                }
                var packed = MirrorParts.Pack(grads);
                packs.Add(packed);
                sends.Add(_ctx.DataPlane.SendAsync(plan.Workers[peer].DataEndpoint,
                    StepTags.Make(StepTags.Kind.ReplicaGradients, fence, MoEOrdinal, 0, _ctx.Worker, peer), packed));
            }
            _ctx.Wait(Task.WhenAll(sends), token, what + ": send");
            _ctx.Wait(Task.WhenAll(receives.Values), token, what + ": receive");
            foreach (var (peer, locals) in _peers)
            {
                using var frame = receives[peer].Result;
                using var packed = frame.ToTensor();
                var layout = locals.SelectMany(k => CoverOf(k, peer).SelectMany(_ => _unitParams[k])).ToList();
                var grads = MirrorParts.UnpackGradients(packed, layout, $"{what} from worker {peer}");
                int offset = 0;
                foreach (int k in locals)
                {
                    int n = _paramStart[k + 1] - _paramStart[k];
                    if (!theirs.TryGetValue(k, out var nodes)) theirs[k] = nodes = new Dictionary<TreeNode, Tensor?[]?>();
                    foreach (var node in CoverOf(k, peer))
                    {
                        nodes[node] = grads[offset..(offset + n)];
                        offset += n;
                    }
                }
            }
            using var scope = NewDisposeScope();
            using var _ = no_grad();
            foreach (int k in _replicaOf.Keys)
            {
                var nodes = theirs.TryGetValue(k, out var t) ? t : new Dictionary<TreeNode, Tensor?[]?>();
                foreach (var (node, partial) in _replicaTrees[k].Partials) nodes[node] = partial;
                var root = ReductionTree.CombineRoot(leaves, nodes, GradientTree.Add);
                _replicaTrees[k].Install(root);
            }
        }
        finally
        {
            foreach (var p in packs) p.Dispose();
            foreach (var nodes in theirs.Values)
                foreach (var grads in nodes.Values)
                    if (grads is not null) Dispose(grads);
        }
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

    private Frame Receive(Int128 tag, CancellationToken token)
    {
        var task = _ctx.DataPlane.ReceiveAsync(tag, token);
        _ctx.Wait(task, token, $"shard L{MoEOrdinal}: tokens under tag {tag:X}");
        return task.Result;
    }

    private void Send(string endpoint, Int128 tag, Tensor value, CancellationToken token)
        => _ctx.Wait(_ctx.DataPlane.SendAsync(endpoint, tag, value.contiguous()), token, $"shard L{MoEOrdinal}: reply to {endpoint}");

    public void Dispose()
    {
        DropGraphs();
        ClearContributions();
        foreach (var (_, p) in _params) p.grad = null;
    }
}
