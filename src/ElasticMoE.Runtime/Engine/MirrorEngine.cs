using ElasticMoE.Planning;
using ElasticMoE.Runtime.DataPlane;
using ElasticMoE.Runtime.Protocol;
using ElasticMoE.State;
using ElasticMoE.Training;
using static TorchSharp.torch;

namespace ElasticMoE.Runtime.Engine;

/// <summary>
/// Mirrors (<c>cluster.redundancy = r</c>): how a worker keeps, on the r keepers the plan gives it (workers of r
/// other nodes, see <c>MirrorPlanner</c>), a copy of every unit not yet on r + 1 nodes — at the same step, so any r
/// nodes lost at once lose nothing.
/// </summary>
/// <remarks>
/// <para>
/// What travels is the step's gradient, not the updated state. A mirror of the state sent after the update
/// leaves a window (update applied, copy not yet arrived) in which a lost node's new state exists nowhere,
/// while every other unit has moved on: its step could then be neither redone nor rolled forward. The
/// gradient closes it: the owner sends it to each of its keepers before it reports its step computed (and every
/// keeper acknowledges it before that), so by the time the coordinator sends any update, every mirror can apply
/// it too — the same AdamW code on the same inputs, so mirror and original stay equal bit for bit. An
/// interrupted update is rolled forward on mirrors exactly as on originals (units record the step they
/// applied).
/// </para>
/// <para>
/// Gradients are one third of a unit's state (weights and two moments), and each keeper's extra work is
/// one optimizer update of what it mirrors: r mirrors cost r times the bytes and the updates.
/// </para>
/// </remarks>
public static class MirrorParts
{
    /// <summary>
    /// The parts in which <paramref name="source"/> sends the gradients of its mirrored units, by part number:
    /// part 0 is what its stage updates (its stage slice and private experts), part 1 + o its shared shard of
    /// MoE layer o. Both ends compute this from the plan, so they agree on every unit's place in a frame.
    /// </summary>
    public static SortedDictionary<int, List<UnitId>> Of(TrainingPlan plan, int source, Configuration.ModelOptions model)
    {
        var result = new SortedDictionary<int, List<UnitId>>();
        foreach (var u in plan.MirroredUnitsOf(source, model))
        {
            int part = u.Kind == UnitKind.Expert && !plan.ShardIsPrivate(u.Block - model.DenseLayers, source, model.DenseLayers)
                ? 1 + u.Block - model.DenseLayers
                : 0;
            if (!result.TryGetValue(part, out var list)) result[part] = list = new List<UnitId>();
            list.Add(u);
        }
        foreach (var list in result.Values) list.Sort();
        return result;
    }

    /// <summary>
    /// All gradients of <paramref name="units"/> in one flat float32 tensor: every parameter's gradient
    /// flattened (zeros where it has none), then one presence flag per parameter (1 = has a gradient), so
    /// "no token reached this expert" survives the trip as "no gradient", as AdamW needs.
    /// </summary>
    public static Tensor Pack(IReadOnlyList<StateUnit> units)
        => Pack(units.SelectMany(u => u.Parameters).Select(p => (p.Param, p.Param.grad)).ToList());

    /// <summary>Gradients given apart from their parameters (null = none), packed as <see cref="Pack(IReadOnlyList{StateUnit})"/> packs them.</summary>
    public static Tensor Pack(IReadOnlyList<(Tensor Param, Tensor? Grad)> gradients)
    {
        using var scope = NewDisposeScope();
        var pieces = new List<Tensor>();
        var present = new List<float>();
        foreach (var (p, g) in gradients)
        {
            pieces.Add(g is null ? zeros(p.numel(), ScalarType.Float32) : g.detach().reshape(-1).to(ScalarType.Float32, CPU));
            present.Add(g is null ? 0f : 1f);
        }
        pieces.Add(tensor(present.ToArray()));
        return cat(pieces, 0).MoveToOuterDisposeScope();
    }

    /// <summary>Sets the gradients of <paramref name="units"/> from a <see cref="Pack"/>ed tensor made of the same units.</summary>
    public static void Unpack(Tensor packed, IReadOnlyList<StateUnit> units)
    {
        var parameters = units.SelectMany(u => u.Parameters).ToList();
        var grads = UnpackGradients(packed, units);
        for (int i = 0; i < parameters.Count; i++) parameters[i].Param.grad = grads[i];
        // The parameters hold their own references.
        foreach (var g in grads) g?.Dispose();
    }

    /// <summary>
    /// The gradients of a <see cref="Pack"/>ed tensor made of <paramref name="units"/>, one per parameter in
    /// their order (null where it had none), shaped, typed and placed like the parameter; the caller owns them.
    /// </summary>
    public static Tensor?[] UnpackGradients(Tensor packed, IReadOnlyList<StateUnit> units)
        => UnpackGradients(packed, units.SelectMany(u => u.Parameters).Select(p => p.Param).ToList(), string.Join(", ", units.Select(u => u.Id)));

    /// <summary>The gradients of a tensor <see cref="Pack(IReadOnlyList{ValueTuple{Tensor, Tensor}})"/>ed for <paramref name="parameters"/>.</summary>
    public static Tensor?[] UnpackGradients(Tensor packed, IReadOnlyList<Tensor> parameters, string what)
    {
        long expected = parameters.Sum(p => p.numel()) + parameters.Count;
        if (packed.numel() != expected)
            throw new InvalidOperationException($"packed gradients hold {packed.numel()} values, {what} need {expected}");
        var result = new Tensor?[parameters.Count];
        using var scope = NewDisposeScope();
        var flags = packed.narrow(0, expected - parameters.Count, parameters.Count).data<float>().ToArray();
        long offset = 0;
        for (int i = 0; i < parameters.Count; i++)
        {
            var p = parameters[i];
            long n = p.numel();
            if (flags[i] != 0f)
                result[i] = packed.narrow(0, offset, n).reshape(p.shape).to(p.dtype, p.device).clone().DetachFromDisposeScope();
            offset += n;
        }
        return result;
    }
}

/// <summary>
/// The sending half: after a stage's backward (or when a shard's gradients are final) the gradients of
/// the units its keepers mirror go to every keeper, and the attempt waits for all their acknowledgements.
/// Tags name source and keeper, so the acknowledgements of several keepers never meet.
/// </summary>
public static class MirrorSender
{
    public static void Send(WorkerContext ctx, Fence fence, CancellationToken token, int part, IReadOnlyList<StateUnit> units)
    {
        var plan = ctx.ActivePlan;
        var keepers = plan.MirrorKeepersOf(ctx.Worker);
        if (keepers.Length == 0 || units.Count == 0) return;
        using var packed = MirrorParts.Pack(units);
        var acks = keepers.Select(k => ctx.DataPlane.ReceiveAsync(StepTags.Make(StepTags.Kind.MirrorAck, fence, part, 0, ctx.Worker, k), token)).ToArray();
        var sends = keepers.Select(k => ctx.DataPlane.SendAsync(plan.Workers[k].DataEndpoint,
            StepTags.Make(StepTags.Kind.MirrorGradients, fence, part, 0, ctx.Worker, k), packed)).ToArray();
        for (int i = 0; i < keepers.Length; i++)
            ctx.Wait(sends[i], token, $"mirror gradients (part {part}) to keeper rank {keepers[i]}");
        for (int i = 0; i < keepers.Length; i++)
        {
            ctx.Wait(acks[i], token, $"mirror acknowledgement (part {part}) from keeper rank {keepers[i]}");
            acks[i].Result.Dispose();
        }
    }
}

/// <summary>
/// The keeping half, on a keeper: the mirrored units of each (source rank, part), the gradients received
/// for the current compute attempt, and the update of the mirrors with the step's update message.
/// </summary>
public sealed class MirrorEngine : IDisposable
{
    private readonly WorkerContext _ctx;
    private readonly AdamW _optimizer;
    private readonly List<(int Source, int Part, List<StateUnit> Units)> _groups = new();
    private readonly Dictionary<(int Source, int Part), Frame> _received = new();
    private Fence _computeFence = new(-1, -1, -1);

    public MirrorEngine(WorkerContext ctx)
    {
        _ctx = ctx;
        var t = ctx.Config.Train;
        _optimizer = new AdamW(t.Beta1, t.Beta2, t.AdamEps, t.WeightDecay);
        var plan = ctx.ActivePlan;
        for (int source = 0; source < plan.WorldSize; source++)
        {
            if (source == ctx.Worker || Array.IndexOf(plan.MirrorKeepersOf(source), ctx.Worker) < 0) continue;
            foreach (var (part, units) in MirrorParts.Of(plan, source, ctx.Config.Model))
                _groups.Add((source, part, units.Select(u => ctx.Units[u]).ToList()));
        }
    }

    /// <summary>True when this worker mirrors nothing under the plan.</summary>
    public bool IsEmpty => _groups.Count == 0;

    public int MirroredUnits => _groups.Sum(g => g.Units.Count);

    /// <summary>
    /// A new compute attempt: forgets the gradients of the previous one and returns the receives to post,
    /// one per (source, part), each to be handed back through <see cref="Received"/>.
    /// </summary>
    public List<(int Source, int Part, Task<Frame> Frame)> Begin(Fence fence, CancellationToken token)
    {
        ClearReceived();
        _computeFence = fence;
        return _groups.Select(g => (g.Source, g.Part, _ctx.DataPlane.ReceiveAsync(StepTags.Make(StepTags.Kind.MirrorGradients, fence, g.Part, 0, g.Source, _ctx.Worker), token))).ToList();
    }

    /// <summary>Keeps a received gradient frame of the current attempt and acknowledges it to its source.</summary>
    public Task Received(Fence fence, int source, int part, Frame frame)
    {
        if (fence != _computeFence)
        {
            frame.Dispose();
            return Task.CompletedTask;
        }
        if (_received.Remove((source, part), out var old)) old.Dispose();
        _received[(source, part)] = frame;
        return _ctx.DataPlane.SendAsync(_ctx.ActivePlan.Workers[source].DataEndpoint, StepTags.Make(StepTags.Kind.MirrorAck, fence, part, 0, source, _ctx.Worker),
            ReadOnlyMemory<byte>.Empty);
    }

    /// <summary>
    /// Applies the step to every mirrored unit that has not applied it yet, from the gradients of compute
    /// attempt <c>u.ComputeAttempt</c>: the same all-or-nothing per unit, and the same maths, as the originals.
    /// </summary>
    public (int Applied, int Already) Apply(ApplyUpdate u)
    {
        long step = u.Fence.Step;
        var computeFence = u.Fence with { Attempt = u.ComputeAttempt };
        int applied = 0, already = 0;
        foreach (var (source, part, units) in _groups)
        {
            if (units.All(x => x.AppliedStep >= step)) { already += units.Count; continue; }
            if (computeFence != _computeFence || !_received.TryGetValue((source, part), out var frame))
                throw new InvalidOperationException($"mirror of rank {source} part {part}: no gradients of step {step} attempt {u.ComputeAttempt} arrived");
            using var scope = NewDisposeScope();
            using (var packed = frame.ToTensor()) MirrorParts.Unpack(packed, units);
            foreach (var unit in units)
            {
                if (UnitUpdates.Apply(_ctx, _optimizer, unit, u)) applied++;
                else already++;
            }
            foreach (var unit in units)
                foreach (var (_, p) in unit.Parameters) p.grad = null;
        }
        return (applied, already);
    }

    private void ClearReceived()
    {
        foreach (var f in _received.Values) f.Dispose();
        _received.Clear();
    }

    public void Dispose() => ClearReceived();
}

/// <summary>One step's update of one unit, wherever the unit is (stage, mirror).</summary>
public static class UnitUpdates
{
    /// <summary>
    /// Applies step <c>u.Fence.Step</c> to <paramref name="unit"/> unless it already has: AdamW from its
    /// gradient, or, for a router bias, the aux-loss-free bias step from the step's expert loads.
    /// </summary>
    public static bool Apply(WorkerContext ctx, AdamW optimizer, StateUnit unit, ApplyUpdate u)
    {
        long step = u.Fence.Step;
        if (unit.Id.Kind != UnitKind.RouterBias) return optimizer.StepUnit(unit, step, u.Lr, u.ClipScale);
        if (unit.AppliedStep >= step) return false;
        ctx.Model.Blocks[unit.Id.Block].MoE!.Router.UpdateBias(u.LayerLoads[ctx.MoEOrdinal(unit.Id.Block)], ctx.Config.Model.MoE.BiasUpdateRate);
        unit.TryMarkApplied(step);
        return true;
    }
}
