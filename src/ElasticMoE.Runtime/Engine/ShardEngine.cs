using ElasticMoE.Model;
using ElasticMoE.Runtime.DataPlane;
using ElasticMoE.Runtime.Protocol;
using ElasticMoE.Training;
using static TorchSharp.torch;

namespace ElasticMoE.Runtime.Engine;

/// <summary>
/// The routed experts of one MoE layer placed on one worker, with their optimizer state. Receives
/// dispatched tokens, runs the experts, returns outputs; on the backward request runs
/// <c>backward(grad)</c> on the kept graph and returns the input gradients. Parameter gradients
/// accumulate over every contribution of the step and are applied once, when the coordinator says so.
/// </summary>
public sealed class ShardEngine : IDisposable
{
    private readonly WorkerContext _ctx;
    private readonly MoELayer _layer;
    private readonly int[] _experts;
    private readonly List<(string Name, Tensor Param)> _params;
    private readonly AdamW _optimizer;
    private readonly Dictionary<(long Step, int Requester, int MicroBatch), (Tensor Input, Tensor Output)> _graphs = new();
    private readonly TimeSpan _timeout = TimeSpan.FromSeconds(120);

    public ShardEngine(WorkerContext ctx, int moeOrdinal)
    {
        _ctx = ctx;
        MoEOrdinal = moeOrdinal;
        _layer = ctx.Model.Blocks[moeOrdinal + ctx.Config.Model.DenseLayers].MoE
                 ?? throw new InvalidOperationException($"block {moeOrdinal + ctx.Config.Model.DenseLayers} is not an MoE layer");
        _experts = ctx.Plan.ExpertsOn(moeOrdinal, ctx.Worker);
        _params = ctx.ExpertParameters(moeOrdinal);
        var t = ctx.Config.Train;
        _optimizer = new AdamW(t.Beta1, t.Beta2, t.AdamEps, t.WeightDecay);
    }

    public int MoEOrdinal { get; }
    public IReadOnlyList<int> Experts => _experts;
    public AdamW Optimizer => _optimizer;
    public IReadOnlyList<(string Name, Tensor Param)> Parameters => _params;
    public int PendingGraphs => _graphs.Count;

    public void Forward(ExpertForward req)
    {
        if (req.Counts.Length != _experts.Length)
            throw new InvalidOperationException($"shard L{MoEOrdinal}@{_ctx.Worker} hosts {_experts.Length} experts but got counts for {req.Counts.Length}");
        // Intermediate handles die with the scope; the graph itself is held by libtorch through the
        // output, which (with its input) is kept until the matching backward request.
        using var scope = NewDisposeScope();
        using var frame = Receive(req.DataTag);
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
        Send(req.ReplyEndpoint, req.ReplyTag, output.detach());
        if (req.Train)
            _graphs[(req.Step, req.Requester, req.MicroBatch)] = (x.DetachFromDisposeScope(), output.DetachFromDisposeScope());
    }

    public void Backward(ExpertBackward req)
    {
        if (!_graphs.Remove((req.Step, req.Requester, req.MicroBatch), out var saved))
            throw new InvalidOperationException($"shard L{MoEOrdinal}@{_ctx.Worker}: backward for step {req.Step} worker {req.Requester} micro-batch {req.MicroBatch} without its forward");
        using var scope = NewDisposeScope();
        using var input = saved.Input;
        using var output = saved.Output;
        using var frame = Receive(req.DataTag);
        var grad = frame.ToTensor().to(_ctx.Device);
        output.backward(new[] { grad });
        Send(req.ReplyEndpoint, req.ReplyTag, input.grad!);
    }

    public double GradSumSq() => GradClip.SumOfSquares(_params.Select(p => p.Param));

    public void Apply(ApplyUpdate u)
    {
        using var scope = NewDisposeScope();
        _optimizer.Step(_params, u.Lr, u.ClipScale);
        // None, not zero, like Module.zero_grad(): an expert that gets no token in a step has no gradient
        // and AdamW leaves it alone, exactly as in the single-process loop.
        foreach (var (_, p) in _params) p.grad = null;
        DropGraphs();
    }

    /// <summary>Forgets graphs of an abandoned step (never needed in a clean run: each forward meets its backward).</summary>
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

    private Frame Receive(long tag)
    {
        var task = _ctx.DataPlane.ReceiveAsync(tag);
        if (!task.Wait(_timeout, _ctx.Stopping)) throw new TimeoutException($"shard L{MoEOrdinal}@{_ctx.Worker}: no tokens under tag {tag:X} within {_timeout.TotalSeconds:F0} s");
        return task.Result;
    }

    private void Send(string endpoint, long tag, Tensor value)
    {
        var task = _ctx.DataPlane.SendAsync(endpoint, tag, value.contiguous());
        if (!task.Wait(_timeout, _ctx.Stopping)) throw new TimeoutException($"shard L{MoEOrdinal}@{_ctx.Worker}: reply to {endpoint} not sent within {_timeout.TotalSeconds:F0} s");
    }

    public void Dispose()
    {
        DropGraphs();
        _optimizer.Dispose();
    }
}
