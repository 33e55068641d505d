using System.IO.Hashing;
using ElasticMoE.Data;
using ElasticMoE.Model;
using ElasticMoE.Runtime.DataPlane;
using ElasticMoE.Runtime.Protocol;
using ElasticMoE.State;
using ElasticMoE.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace ElasticMoE.Runtime.Engine;

/// <summary>
/// The compute of one pipeline stage of one data-parallel replica under one plan: its share of the
/// micro-batches (GPipe: all forwards, then all backwards), activations and gradients to and from the
/// neighbouring stages over the data plane, the ring all-reduce of its dense gradients across replicas,
/// and the update of its units (its stage slice, and the experts only it calls). No actor code: the
/// PipelineStage actor drives it, and builds a new one whenever the plan changes.
/// </summary>
public sealed class StageEngine
{
    private readonly WorkerContext _ctx;
    private readonly DistributedExpertExecutor _executor;
    private readonly AdamW _optimizer;
    private readonly List<StateUnit> _stageUnits;
    private readonly List<(string Name, Tensor Param)> _dense;
    private readonly CollectiveGroup? _replicas;
    private readonly MoELayer[] _moe;
    // Experts only this stage calls: their gradients are complete when its backward is, so it reports
    // their norm with its own and updates them itself (no round trip to a shard).
    private readonly List<StateUnit> _privateExperts;
    private readonly List<(string Name, Tensor Param)> _privateExpertParams;
    // Units whose gradients go to this worker's buddy each step (redundancy), in the order it expects.
    private readonly List<StateUnit> _mirrored;

    public StageEngine(WorkerContext ctx, IShardMessenger messenger)
    {
        _ctx = ctx;
        var t = ctx.Config.Train;
        _optimizer = new AdamW(t.Beta1, t.Beta2, t.AdamEps, t.WeightDecay);
        _stageUnits = ctx.StageUnits();
        _dense = WorkerContext.ParametersOf(_stageUnits);
        _executor = new DistributedExpertExecutor(ctx, messenger);
        _moe = ctx.StageMoELayers.ToArray();
        var plan = ctx.ActivePlan;
        _privateExperts = _moe.Select(l => ctx.MoEOrdinal(l.LayerIndex))
            .Where(o => plan.ShardIsPrivate(o, ctx.Worker, ctx.Config.Model.DenseLayers))
            .SelectMany(ctx.ExpertUnits).ToList();
        _privateExpertParams = WorkerContext.ParametersOf(_privateExperts);
        _mirrored = MirrorParts.Of(plan, ctx.Worker, ctx.Config.Model).GetValueOrDefault(0, []).Select(u => ctx.Units[u]).ToList();
        foreach (var layer in _moe) layer.Executor = _executor;
        if (plan.Dp > 1)
        {
            var group = plan.StageGroup(ctx.Stage);
            _replicas = new CollectiveGroup(ctx.DataPlane, group.Select(w => plan.Workers[w].DataEndpoint).ToArray(), ctx.Replica);
        }
    }

    public IReadOnlyList<(string Name, Tensor Param)> DenseParameters => _dense;
    public IEnumerable<(string Name, Tensor Param)> OwnedParameters => _ctx.Replica == 0 ? _dense.Concat(_privateExpertParams) : _privateExpertParams;

    public StepComputed RunStep(Fence fence, CancellationToken token)
    {
        var ctx = _ctx;
        var plan = ctx.ActivePlan;
        var t = ctx.Config.Train;
        int totalMicro = t.MicroBatchesPerStep;
        var mine = BatchAssignment.MicroBatchesFor(ctx.Replica, plan.Dp, totalMicro);
        using var scope = NewDisposeScope();
        var clock = System.Diagnostics.Stopwatch.StartNew();
        ctx.Model.train();
        // As Module.zero_grad() does; a redone attempt starts from here too, so nothing of an aborted
        // attempt's partial accumulation survives.
        foreach (var (_, p) in _dense.Concat(_privateExpertParams)) p.grad = null;
        foreach (var layer in _moe) layer.TakeStepCounts();
        _executor.Begin(fence, token, train: true);

        // Each micro-batch's gradients go into the canonical tree (ReductionTree), never into a running sum.
        var (lo, hi) = BatchAssignment.RangeFor(ctx.Replica, plan.Dp, totalMicro);
        using var gradients = new GradientTree(_dense.Concat(_privateExpertParams).Select(d => d.Param).ToList(), totalMicro, lo, hi);
        var losses = new double[ctx.IsLastStage ? mine.Length : 0];
        double lossSum = 0;
        var pending = new List<(int M, Tensor Input, Tensor Output, Tensor? Aux)>();
        foreach (int m in mine)
        {
            // Each micro-batch's tensors die with its scope unless a later backward needs them, so the
            // last stage holds one micro-batch's activations at a time, as the single-process loop does.
            using var micro = NewDisposeScope();
            _executor.MicroBatch = m;
            var (input, targets) = StageInput(fence, token, m, StepTags.Kind.Activation, train: true);
            var h = ctx.Model.RunBlocks(input, ctx.Blocks.First, ctx.Blocks.End);
            var aux = MoELayer.SumAuxLoss(_moe);
            ctx.MaybeInject(FaultPhase.Forward, fence);
            if (ctx.IsLastStage)
            {
                var ce = MoETransformer.CrossEntropy(ctx.Model.Head(h), targets!);
                var total = aux is null ? ce : ce.Plus(aux);
                using var perMicro = (1.0 / totalMicro).ToScalar();
                ctx.MaybeInject(FaultPhase.Backward, fence);
                total.mul(perMicro).backward();
                gradients.Take(m);
                double loss = ce.item<float>();
                if (!double.IsFinite(loss)) throw new TrainingDivergedException(fence.Step, "the loss", loss);
                losses[m - lo] = loss;
                lossSum += loss;
                if (!ctx.IsFirstStage) SendTo(fence, token, -1, StepTags.Kind.ActivationGrad, m, input.grad!);
            }
            else
            {
                SendTo(fence, token, +1, StepTags.Kind.Activation, m, h.detach());
                pending.Add((m, input.MoveToOuterDisposeScope(), h.MoveToOuterDisposeScope(), aux?.MoveToOuterDisposeScope()));
            }
            _executor.ThrowIfBackwardFailed();
        }
        // Backwards in reverse order of the forwards, each as soon as its gradient arrives.
        for (int i = pending.Count - 1; i >= 0; i--)
        {
            var (m, input, output, aux) = pending[i];
            _executor.MicroBatch = m;
            ctx.MaybeInject(FaultPhase.Backward, fence);
            using var frame = Receive(token, StepTags.Make(StepTags.Kind.ActivationGrad, fence, ctx.Stage, m, NeighbourWorker(+1)));
            var grad = frame.ToTensor().to(ctx.Device);
            if (aux is null) output.backward(new[] { grad });
            else
            {
                using var perMicro = (1.0 / totalMicro).ToScalar();
                (output * grad).sum().Plus(aux.mul(perMicro)).backward();   // same gradients as backward(grad) plus the aux term
            }
            _executor.ThrowIfBackwardFailed();
            gradients.Take(m);
            if (!ctx.IsFirstStage) SendTo(fence, token, -1, StepTags.Kind.ActivationGrad, m, input.grad!);
        }

        _executor.ThrowIfBackwardFailed();
        double computeSeconds = clock.Elapsed.TotalSeconds;
        if (_replicas is null) gradients.InstallRoot();
        else AllReduceDenseGradients(fence, token, gradients);
        var norms = GradClip.SumsOfSquares(_dense.Concat(_privateExpertParams));
        // Before the step counts as computed, the buddy holds its gradients (see MirrorParts).
        MirrorSender.Send(ctx, fence, token, 0, _mirrored);
        var counts = _moe.Select(l => l.TakeStepCounts()).ToArray();
        return new StepComputed(fence, ctx.Worker, lossSum, ctx.IsLastStage ? mine.Length : 0, GradClip.CanonicalTotal(norms),
            _moe.Select(l => ctx.MoEOrdinal(l.LayerIndex)).ToArray(), counts)
        {
            ComputeSeconds = computeSeconds,
            WorkingSetBytes = Environment.WorkingSet,
            Threads = get_num_threads(),
            Losses = losses,
            FirstMicroBatch = lo,
            Norms = NamedSums.Of(norms),
        };
    }

    /// <summary>
    /// Applies step <c>u.Fence.Step</c> to every unit of this stage that has not applied it yet: all or
    /// nothing per unit, so a roll-forward after an interrupted update finishes exactly what is missing.
    /// </summary>
    public UpdateApplied Apply(ApplyUpdate u)
    {
        using var scope = NewDisposeScope();
        int applied = 0, already = 0;
        foreach (var unit in _stageUnits.Concat(_privateExperts))
        {
            bool did = UnitUpdates.Apply(_ctx, _optimizer, unit, u);
            if (did) applied++; else already++;
            // An update interrupted here leaves some units at the new step and the rest at the old one:
            // exactly what the per-unit applied step records and the roll-forward completes.
            if (did && applied == 1) _ctx.MaybeInject(FaultPhase.Update, u.Fence);
        }
        foreach (var (_, p) in _privateExpertParams) p.grad = null;
        return new UpdateApplied(u.Fence, _ctx.Worker, u.Checksum ? Checksum() : 0, applied, already);
    }

    public EvalComputed Evaluate(Fence fence, CancellationToken token)
    {
        var ctx = _ctx;
        var t = ctx.Config.Train;
        var mine = BatchAssignment.MicroBatchesFor(ctx.Replica, ctx.ActivePlan.Dp, t.EvalBatches);
        double sum = 0;
        var losses = new double[ctx.IsLastStage ? mine.Length : 0];
        ctx.Model.eval();
        _executor.Begin(fence, token, train: false);
        try
        {
            using var _ = no_grad();
            foreach (int b in mine)
            {
                using var scope = NewDisposeScope();
                _executor.MicroBatch = b;
                var (input, targets) = StageInput(fence, token, b, StepTags.Kind.EvalActivation, train: false);
                var h = ctx.Model.RunBlocks(input, ctx.Blocks.First, ctx.Blocks.End);
                if (ctx.IsLastStage) sum += losses[b - mine[0]] = MoETransformer.CrossEntropy(ctx.Model.Head(h), targets!).item<float>();
                else SendTo(fence, token, +1, StepTags.Kind.EvalActivation, b, h);
            }
        }
        finally
        {
            foreach (var layer in _moe) layer.TakeStepCounts();
            _executor.Train = true;
            ctx.Model.train();
        }
        return new EvalComputed(fence, ctx.Worker, sum, ctx.IsLastStage ? mine.Length : 0) { Losses = losses, FirstBatch = mine.Length > 0 ? mine[0] : 0 };
    }

    /// <summary>A hash of this stage's units (values, moments, applied step): equal on every replica, or they have drifted.</summary>
    public ulong Checksum()
    {
        var hash = new XxHash64();
        Span<byte> buf = stackalloc byte[8];
        foreach (var unit in _stageUnits)
        {
            BitConverter.TryWriteBytes(buf, unit.Checksum());
            hash.Append(buf);
        }
        return hash.GetCurrentHashAsUInt64();
    }

    // First stage: the embedding of the micro-batch's bytes. Later stages: the previous stage's output,
    // made a leaf that requires grad so its gradient can be sent back.
    private (Tensor Input, Tensor? Targets) StageInput(Fence fence, CancellationToken token, int m, StepTags.Kind kind, bool train)
    {
        var ctx = _ctx;
        var t = ctx.Config.Train;
        Tensor? x = null, y = null;
        if (ctx.IsFirstStage || ctx.IsLastStage)
            (x, y) = train ? ctx.Sampler.TrainBatch(fence.Step, m * t.MicroBatch, t.MicroBatch, ctx.Device)
                           : ctx.Sampler.ValidationBatch(m * t.MicroBatch, t.MicroBatch, ctx.Device);
        if (ctx.IsFirstStage) return (ctx.Model.Embed(x!), y);
        using var frame = Receive(token, StepTags.Make(kind, fence, ctx.Stage, m, NeighbourWorker(-1)));
        var input = frame.ToTensor().to(ctx.Device);
        if (train) input.requires_grad_(true);
        return (input, y);
    }

    // The replicas' partial sums combined in the canonical tree (CollectiveGroup.TreeAllReduceAsync), so every
    // replica ends with the single-process loop's bits; with bfloat16 compression, this replica's partials are added
    // in tree order first and the ring sums the replicas (close to the loop, not equal: see the config).
    private void AllReduceDenseGradients(Fence fence, CancellationToken token, GradientTree gradients)
    {
        var plan = _ctx.ActivePlan;
        int totalMicro = _ctx.Config.Train.MicroBatchesPerStep;
        _ctx.MaybeInject(FaultPhase.AllReduce, fence);
        using var scope = NewDisposeScope();
        Tensor Flat(Tensor?[]? grads) => cat(_dense.Select((d, i) => (grads?[i] ?? zeros_like(d.Param)).reshape(-1)).ToList(), 0)
            .to(ScalarType.Float32).cpu().contiguous();
        var partials = gradients.Partials.Select(p => (p.Node, Value: Flat(p.Grads))).ToList();
        long length = _dense.Sum(d => d.Param.numel());
        var flat = empty(length, ScalarType.Float32);
        // The attempt rides in the phase bits, so a redo's collective never meets an aborted one's frames.
        var id = CollectiveTags.CollectiveId(fence.Epoch, fence.Step, _ctx.Stage, phase: fence.Attempt & 0xF);
        if (_ctx.Config.Cluster.CompressGradients)
        {
            flat.zero_();
            foreach (var (_, value) in partials) flat.add_(value, Scalars.One);   // in tree order, left to right
            _ctx.Wait(_replicas!.AllReduceSumAsync(flat, id, Compression.BFloat16, token), token, "dense gradient all-reduce");
        }
        else
        {
            var ranges = Enumerable.Range(0, plan.Dp).Select(r => BatchAssignment.RangeFor(r, plan.Dp, totalMicro)).ToList();
            _ctx.Wait(_replicas!.TreeAllReduceAsync(flat, partials, ranges, totalMicro, id, token),
                token, "dense gradient all-reduce");
        }
        long offset = 0;
        using var _ = no_grad();
        foreach (var (_, p) in _dense)
        {
            long n = p.numel();
            // The parameter holds its own reference: the scope may dispose this handle.
            p.grad = flat.narrow(0, offset, n).view(p.shape).to(p.dtype, p.device).clone();
            offset += n;
        }
    }

    private int NeighbourWorker(int direction) => _ctx.ActivePlan.WorkerAt(_ctx.Replica, _ctx.Stage + direction);

    private void SendTo(Fence fence, CancellationToken token, int direction, StepTags.Kind kind, int m, Tensor value)
    {
        int peer = NeighbourWorker(direction);
        int receiverStage = _ctx.Stage + direction;
        Int128 tag = StepTags.Make(kind, fence, receiverStage, m, _ctx.Worker);
        _ctx.Wait(_ctx.DataPlane.SendAsync(_ctx.ActivePlan.Workers[peer].DataEndpoint, tag, value.detach().contiguous()), token, $"send to worker {peer}");
    }

    private Frame Receive(CancellationToken token, Int128 tag)
    {
        var task = _ctx.DataPlane.ReceiveAsync(tag, token);
        _ctx.Wait(task, token, "receive from a neighbouring stage");
        return task.Result;
    }

    /// <summary>Detaches the executor from the model's layers (the next plan's engine installs its own).</summary>
    public void Detach()
    {
        foreach (var layer in _moe) if (ReferenceEquals(layer.Executor, _executor)) layer.Executor = LocalExpertExecutor.Instance;
    }
}
