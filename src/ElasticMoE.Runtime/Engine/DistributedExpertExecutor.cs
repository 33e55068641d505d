using ElasticMoE.Model;
using ElasticMoE.Planning;
using ElasticMoE.Runtime.DataPlane;
using ElasticMoE.Runtime.Protocol;
using TorchSharp;
using static TorchSharp.torch;

namespace ElasticMoE.Runtime.Engine;

/// <summary>Delivers a control message to the expert shard of (MoE layer ordinal, owner worker).</summary>
public interface IShardMessenger
{
    void Send(int moeOrdinal, int ownerWorker, IElasticMoEMessage message);
}

/// <summary>
/// Runs the routed experts of one MoE layer wherever the plan put them. Experts private to this worker
/// run in its own autograd graph; the rest go to their shards as one request per owner, all sent before
/// any reply is awaited, inside a custom autograd function whose backward sends the output gradients the
/// same way. This is the one mechanism of the runtime: detached tensors out, gradients back,
/// <c>backward(grad)</c> on the other side.
/// </summary>
public sealed class DistributedExpertExecutor(WorkerContext context, IShardMessenger messenger) : IExpertExecutor
{
    /// <summary>The attempt being computed, and its cancellation: set by the stage when a step or evaluation begins.</summary>
    public Fence Fence { get; private set; }
    public CancellationToken Token { get; private set; }
    /// <summary>Set by the stage before each micro-batch: tags and replies are keyed by it.</summary>
    public int MicroBatch { get; set; }
    public bool Train { get; set; } = true;

    public void Begin(Fence fence, CancellationToken token, bool train)
    {
        Fence = fence;
        Token = token;
        Train = train;
        Interlocked.Exchange(ref _failure, null);
    }

    public Tensor Run(MoELayer layer, Tensor tokens, long[] counts)
    {
        var plan = context.ActivePlan;
        int ordinal = context.MoEOrdinal(layer.LayerIndex);
        var owners = plan.ExpertOwner[ordinal];
        bool privateLocal = plan.ExpertsPrivateTo(ordinal, context.Worker, layer.LayerIndex);
        if (privateLocal && owners.All(o => o == context.Worker))
            return LocalExpertExecutor.Instance.Run(layer, tokens, counts);

        using var scope = NewDisposeScope();
        var offsets = new long[counts.Length + 1];
        for (int e = 0; e < counts.Length; e++) offsets[e + 1] = offsets[e] + counts[e];

        // Rows of each holder, in ascending expert order: exactly what its shard expects. An expert with r
        // copies sends all of this micro-batch's rows to the copy whose share of the micro-batches holds it
        // (TrainingPlan.CopyFor) and none to the others: a micro-batch's gradient is then computed whole, by a
        // bit-identical copy, as in the single-process loop.
        int microBatches = Train ? context.Config.Train.MicroBatchesPerStep : context.Config.Train.EvalBatches;
        var byOwner = new SortedDictionary<int, (List<long> Rows, List<long> Counts)>();
        for (int e = 0; e < counts.Length; e++)
        {
            var copies = plan.CopiesOf(ordinal, e);
            int chosen = copies.Length == 1 ? 0 : TrainingPlan.CopyFor(MicroBatch, copies.Length, microBatches);
            for (int i = 0; i < copies.Length; i++)
            {
                if (!byOwner.TryGetValue(copies[i], out var entry)) byOwner[copies[i]] = entry = (new List<long>(), new List<long>());
                long n = i == chosen ? counts[e] : 0;
                for (long r = offsets[e]; r < offsets[e] + n; r++) entry.Rows.Add(r);
                entry.Counts.Add(n);
            }
        }

        var result = zeros_like(tokens);
        var remote = new List<(int Owner, Tensor Index, long[] Counts)>();
        foreach (var (owner, (rows, ownerCounts)) in byOwner)
        {
            if (rows.Count == 0) continue;
            var index = tensor(rows.ToArray(), device: tokens.device);
            if (owner == context.Worker && privateLocal)
            {
                var local = RunLocal(layer, tokens.index_select(0, index), ordinal, ownerCounts);
                result = result.index_add(0, index, local, Scalars.One);
            }
            else remote.Add((owner, index, ownerCounts.ToArray()));
        }

        if (remote.Count > 0)
        {
            var call = new RemoteCall(this, context, messenger, ordinal, remote.Select(r => (r.Owner, r.Counts)).ToArray(), Fence, Token, MicroBatch, Train);
            var args = new List<object> { call };
            args.AddRange(remote.Select(r => (object)tokens.index_select(0, r.Index)));
            var outputs = Train
                ? RemoteExpertsFunction.apply(args.ToArray())
                : call.Forward(args.Skip(1).Cast<Tensor>().ToList());
            for (int i = 0; i < remote.Count; i++)
                result = result.index_add(0, remote[i].Index, outputs[i].to(tokens.dtype), Scalars.One);
        }
        return result.MoveToOuterDisposeScope();
    }

    private Tensor RunLocal(MoELayer layer, Tensor rows, int ordinal, List<long> ownerCounts)
        => layer.RunExperts(context.ActivePlan.ExpertsOn(ordinal, context.Worker), rows, ownerCounts);

    /// <summary>One request/reply exchange with every remote owner of a layer, for one micro-batch.</summary>
    private Exception? _failure;

    internal void RecordFailure(Exception ex) => Interlocked.CompareExchange(ref _failure, ex, null);

    /// <summary>Throws the first failure recorded inside a backward pass since the last call, if any.</summary>
    public void ThrowIfBackwardFailed()
    {
        var ex = Interlocked.Exchange(ref _failure, null);
        if (ex is not null) throw new InvalidOperationException($"remote expert backward failed: {ex.Message}", ex);
    }

    internal sealed class RemoteCall(DistributedExpertExecutor owner, WorkerContext context, IShardMessenger messenger, int ordinal,
        (int Owner, long[] Counts)[] targets, Fence fence, CancellationToken token, int microBatch, bool train)
    {
        public DistributedExpertExecutor Executor => owner;

        public List<Tensor> Forward(List<Tensor> inputs)
        {
            var kindIn = train ? StepTags.Kind.ExpertTokens : StepTags.Kind.EvalExpertTokens;
            var kindOut = train ? StepTags.Kind.ExpertOutputs : StepTags.Kind.EvalExpertOutputs;
            var replies = new Task<Frame>[targets.Length];
            var sends = new List<Task>();
            for (int i = 0; i < targets.Length; i++)
            {
                var (target, counts) = targets[i];
                Int128 dataTag = StepTags.Make(kindIn, fence, ordinal, microBatch, context.Worker, target);
                Int128 replyTag = StepTags.Make(kindOut, fence, ordinal, microBatch, context.Worker, target);
                replies[i] = context.DataPlane.ReceiveAsync(replyTag, token);
                sends.Add(context.DataPlane.SendAsync(Endpoint(target), dataTag, inputs[i].detach()));
                messenger.Send(ordinal, target, new ExpertForward(fence, context.Worker, microBatch, counts, dataTag, replyTag, context.DataPlane.Endpoint, train));
            }
            return Collect(sends, replies);
        }

        public List<Tensor> Backward(List<Tensor> outputGrads)
        {
            var replies = new Task<Frame>[targets.Length];
            var sends = new List<Task>();
            for (int i = 0; i < targets.Length; i++)
            {
                int target = targets[i].Owner;
                Int128 dataTag = StepTags.Make(StepTags.Kind.ExpertOutputGrad, fence, ordinal, microBatch, context.Worker, target);
                Int128 replyTag = StepTags.Make(StepTags.Kind.ExpertInputGrad, fence, ordinal, microBatch, context.Worker, target);
                replies[i] = context.DataPlane.ReceiveAsync(replyTag, token);
                sends.Add(context.DataPlane.SendAsync(Endpoint(target), dataTag, outputGrads[i].contiguous()));
                messenger.Send(ordinal, target, new ExpertBackward(fence, context.Worker, microBatch, dataTag, replyTag, context.DataPlane.Endpoint));
            }
            return Collect(sends, replies);
        }

        private List<Tensor> Collect(List<Task> sends, Task<Frame>[] replies)
        {
            var what = $"expert shards of MoE layer {ordinal}, {fence} micro-batch {microBatch}";
            context.Wait(Task.WhenAll(sends), token, what + ": send");
            context.Wait(Task.WhenAll(replies), token, what + ": reply");
            var result = new List<Tensor>(replies.Length);
            foreach (var r in replies)
            {
                using var frame = r.Result;
                result.Add(frame.ToTensor().to(context.Device));
            }
            return result;
        }

        private string Endpoint(int worker) => context.ActivePlan.Workers[worker].DataEndpoint;
    }
}

/// <summary>Autograd node for remote experts: forward ships tokens, backward ships output gradients.</summary>
internal sealed class RemoteExpertsFunction : autograd.MultiTensorFunction<RemoteExpertsFunction>
{
    public override string Name => "RemoteExperts";

    public override List<Tensor> forward(autograd.AutogradContext ctx, params object[] vars)
    {
        var call = (DistributedExpertExecutor.RemoteCall)vars[0];
        ctx.save_data("call", call);
        return call.Forward(vars.Skip(1).Cast<Tensor>().ToList());
    }

    public override List<Tensor> backward(autograd.AutogradContext ctx, List<Tensor> grad_outputs)
    {
        var call = (DistributedExpertExecutor.RemoteCall)ctx.get_data("call");
        // One gradient per argument of apply: none for the call object, then one per token slice.
        var grads = new List<Tensor> { null! };
        try
        {
            grads.AddRange(call.Backward(grad_outputs));
        }
        catch (Exception ex)
        {
            // This runs inside libtorch's autograd engine: an exception escaping here would take the
            // whole process down. Record it, hand back zeros, and let the stage raise it afterwards.
            call.Executor.RecordFailure(ex);
            grads.AddRange(grad_outputs.Select(g => zeros_like(g)));
        }
        return grads;
    }
}
