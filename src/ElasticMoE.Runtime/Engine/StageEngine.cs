using System.Security.Cryptography;
using ElasticMoE.Data;
using ElasticMoE.Model;
using ElasticMoE.Runtime.DataPlane;
using ElasticMoE.Runtime.Protocol;
using ElasticMoE.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace ElasticMoE.Runtime.Engine;

/// <summary>
/// The compute of one pipeline stage of one data-parallel replica: its share of the micro-batches
/// (GPipe: all forwards, then all backwards), activations and gradients to and from the neighbouring
/// stages over the data plane, the ring all-reduce of its dense gradients across replicas, and the
/// optimizer step of its dense parameters. No actor code: the PipelineStage actor drives it.
/// </summary>
public sealed class StageEngine : IDisposable
{
    private readonly WorkerContext _ctx;
    private readonly DistributedExpertExecutor _executor;
    private readonly AdamW _optimizer;
    private readonly List<(string Name, Tensor Param)> _dense;
    private readonly CollectiveGroup? _replicas;
    private readonly MoELayer[] _moe;
    // Experts only this stage calls: their gradients are complete when its backward is, so it reports
    // their norm with its own and the coordinator skips a round trip to their shards.
    private readonly List<(string Name, Tensor Param)> _privateExperts;
    private readonly TimeSpan _timeout = TimeSpan.FromSeconds(120);

    public StageEngine(WorkerContext ctx, IShardMessenger messenger)
    {
        _ctx = ctx;
        var t = ctx.Config.Train;
        _optimizer = new AdamW(t.Beta1, t.Beta2, t.AdamEps, t.WeightDecay);
        _dense = ctx.DenseParameters();
        _executor = new DistributedExpertExecutor(ctx, messenger);
        _moe = ctx.StageMoELayers.ToArray();
        _privateExperts = _moe.Select(l => ctx.MoEOrdinal(l.LayerIndex))
            .Where(o => ctx.Plan.ShardIsPrivate(o, ctx.Worker, ctx.Config.Model.DenseLayers))
            .SelectMany(ctx.ExpertParameters).ToList();
        foreach (var layer in _moe) layer.Executor = _executor;
        var plan = ctx.Plan;
        if (plan.Dp > 1)
        {
            var group = plan.StageGroup(ctx.Stage);
            _replicas = new CollectiveGroup(ctx.DataPlane, group.Select(w => plan.Workers[w].DataEndpoint).ToArray(), ctx.Replica);
        }
    }

    public AdamW Optimizer => _optimizer;
    public IReadOnlyList<(string Name, Tensor Param)> DenseParameters => _dense;

    public StepComputed RunStep(long step)
    {
        var ctx = _ctx;
        var plan = ctx.Plan;
        var t = ctx.Config.Train;
        int totalMicro = t.MicroBatchesPerStep;
        var mine = BatchAssignment.MicroBatchesFor(ctx.Replica, plan.Dp, totalMicro);
        using var scope = NewDisposeScope();
        ctx.Model.train();
        foreach (var (_, p) in _dense) p.grad = null;   // as Module.zero_grad() does
        foreach (var layer in _moe) layer.TakeStepCounts();
        _executor.Train = true;
        _executor.Step = step;

        double lossSum = 0;
        var pending = new List<(int M, Tensor Input, Tensor Output, Tensor? Aux)>();
        foreach (int m in mine)
        {
            // Each micro-batch's tensors die with its scope unless a later backward needs them, so the
            // last stage holds one micro-batch's activations at a time, as the single-process loop does.
            using var micro = NewDisposeScope();
            _executor.MicroBatch = m;
            var (input, targets) = StageInput(step, m, StepTags.Kind.Activation, train: true);
            var h = ctx.Model.RunBlocks(input, ctx.Blocks.First, ctx.Blocks.End);
            var aux = MoELayer.SumAuxLoss(_moe);
            if (ctx.IsLastStage)
            {
                var ce = MoETransformer.CrossEntropy(ctx.Model.Head(h), targets!);
                var total = aux is null ? ce : ce.Plus(aux);
                using var perMicro = (1.0 / totalMicro).ToScalar();
                total.mul(perMicro).backward();
                double loss = ce.item<float>();
                if (!double.IsFinite(loss)) throw new TrainingDivergedException(step, "the loss", loss);
                lossSum += loss;
                if (!ctx.IsFirstStage) SendTo(-1, StepTags.Kind.ActivationGrad, step, m, input.grad!);
            }
            else
            {
                SendTo(+1, StepTags.Kind.Activation, step, m, h.detach());
                pending.Add((m, input.MoveToOuterDisposeScope(), h.MoveToOuterDisposeScope(), aux?.MoveToOuterDisposeScope()));
            }
        }
        // Backwards in reverse order of the forwards, each as soon as its gradient arrives.
        for (int i = pending.Count - 1; i >= 0; i--)
        {
            var (m, input, output, aux) = pending[i];
            _executor.MicroBatch = m;
            using var frame = Receive(StepTags.Make(StepTags.Kind.ActivationGrad, plan.Epoch, step, ctx.Stage, m, NeighbourWorker(+1)));
            var grad = frame.ToTensor().to(ctx.Device);
            if (aux is null) output.backward(new[] { grad });
            else
            {
                using var perMicro = (1.0 / totalMicro).ToScalar();
                (output * grad).sum().Plus(aux.mul(perMicro)).backward();   // same gradients as backward(grad) plus the aux term
            }
            if (!ctx.IsFirstStage) SendTo(-1, StepTags.Kind.ActivationGrad, step, m, input.grad!);
        }

        _executor.ThrowIfBackwardFailed();
        AllReduceDenseGradients(step);
        double sumSq = GradClip.SumOfSquares(_dense.Concat(_privateExperts).Select(d => d.Param));
        var counts = _moe.Select(l => l.TakeStepCounts()).ToArray();
        return new StepComputed(plan.Epoch, step, ctx.Worker, lossSum, ctx.IsLastStage ? mine.Length : 0, sumSq,
            _moe.Select(l => ctx.MoEOrdinal(l.LayerIndex)).ToArray(), counts);
    }

    public UpdateApplied Apply(ApplyUpdate u)
    {
        using var scope = NewDisposeScope();
        _optimizer.Step(_dense, u.Lr, u.ClipScale);
        foreach (var layer in _moe)
            layer.Router.UpdateBias(u.LayerLoads[_ctx.MoEOrdinal(layer.LayerIndex)], _ctx.Config.Model.MoE.BiasUpdateRate);
        return new UpdateApplied(u.Epoch, u.Step, _ctx.Worker, u.Checksum ? Checksum() : 0);
    }

    public EvalComputed Evaluate(long step)
    {
        var ctx = _ctx;
        var t = ctx.Config.Train;
        var mine = BatchAssignment.MicroBatchesFor(ctx.Replica, ctx.Plan.Dp, t.EvalBatches);
        double sum = 0;
        ctx.Model.eval();
        _executor.Train = false;
        _executor.Step = step;
        try
        {
            using var _ = no_grad();
            foreach (int b in mine)
            {
                using var scope = NewDisposeScope();
                _executor.MicroBatch = b;
                var (input, targets) = StageInput(step, b, StepTags.Kind.EvalActivation, train: false);
                var h = ctx.Model.RunBlocks(input, ctx.Blocks.First, ctx.Blocks.End);
                if (ctx.IsLastStage) sum += MoETransformer.CrossEntropy(ctx.Model.Head(h), targets!).item<float>();
                else SendTo(+1, StepTags.Kind.EvalActivation, step, b, h);
            }
        }
        finally
        {
            foreach (var layer in _moe) layer.TakeStepCounts();
            _executor.Train = true;
            ctx.Model.train();
        }
        return new EvalComputed(ctx.Plan.Epoch, step, ctx.Worker, sum, ctx.IsLastStage ? mine.Length : 0);
    }

    /// <summary>A hash of this stage's dense parameters: equal on every replica, or they have drifted.</summary>
    public ulong Checksum()
    {
        using var sha = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        foreach (var (_, p) in _dense)
        {
            using var c = p.detach().cpu().contiguous();
            sha.AppendData(c.bytes);
        }
        return BitConverter.ToUInt64(sha.GetHashAndReset(), 0);
    }

    // First stage: the embedding of the micro-batch's bytes. Later stages: the previous stage's output,
    // made a leaf that requires grad so its gradient can be sent back.
    private (Tensor Input, Tensor? Targets) StageInput(long step, int m, StepTags.Kind kind, bool train)
    {
        var ctx = _ctx;
        var t = ctx.Config.Train;
        Tensor? x = null, y = null;
        if (ctx.IsFirstStage || ctx.IsLastStage)
            (x, y) = train ? ctx.Sampler.TrainBatch(step, m * t.MicroBatch, t.MicroBatch, ctx.Device)
                           : ctx.Sampler.ValidationBatch(m * t.MicroBatch, t.MicroBatch, ctx.Device);
        if (ctx.IsFirstStage) return (ctx.Model.Embed(x!), y);
        using var frame = Receive(StepTags.Make(kind, ctx.Plan.Epoch, step, ctx.Stage, m, NeighbourWorker(-1)));
        var input = frame.ToTensor().to(ctx.Device);
        if (train) input.requires_grad_(true);
        return (input, y);
    }

    private void AllReduceDenseGradients(long step)
    {
        if (_replicas is null) return;
        using var scope = NewDisposeScope();
        var grads = _dense.Select(d => d.Param.grad ?? zeros_like(d.Param)).ToList();
        var flat = cat(grads.Select(g => g.reshape(-1)).ToList(), 0).to(ScalarType.Float32).cpu().contiguous();
        var id = CollectiveTags.CollectiveId(_ctx.Plan.Epoch, step, _ctx.Stage, phase: 0);
        var compression = _ctx.Config.Cluster.CompressGradients ? Compression.BFloat16 : Compression.None;
        Wait(_replicas.AllReduceSumAsync(flat, id, compression), "dense gradient all-reduce");
        long offset = 0;
        using var _ = no_grad();
        foreach (var (_, p) in _dense)
        {
            long n = p.numel();
            var slice = flat.narrow(0, offset, n).view(p.shape).to(p.dtype, p.device);
            // The parameter holds its own reference: the scope may dispose this handle.
            if (p.grad is null) p.grad = slice.clone();
            else p.grad.copy_(slice);
            offset += n;
        }
    }

    private int NeighbourWorker(int direction) => _ctx.Plan.WorkerAt(_ctx.Replica, _ctx.Stage + direction);

    private void SendTo(int direction, StepTags.Kind kind, long step, int m, Tensor value)
    {
        int peer = NeighbourWorker(direction);
        int receiverStage = _ctx.Stage + direction;
        long tag = StepTags.Make(kind, _ctx.Plan.Epoch, step, receiverStage, m, _ctx.Worker);
        Wait(_ctx.DataPlane.SendAsync(_ctx.Plan.Workers[peer].DataEndpoint, tag, value.detach().contiguous()), $"send to worker {peer}");
    }

    private Frame Receive(long tag)
    {
        var task = _ctx.DataPlane.ReceiveAsync(tag);
        Wait(task, "receive from a neighbouring stage");
        return task.Result;
    }

    private void Wait(Task task, string what)
    {
        if (!task.Wait(_timeout, _ctx.Stopping))
            throw new TimeoutException($"worker {_ctx.Worker}: {what} did not complete within {_timeout.TotalSeconds:F0} s");
    }

    public void Dispose() => _optimizer.Dispose();
}
