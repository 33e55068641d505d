using ElasticMoE.Configuration;

namespace ElasticMoE.Planning;

/// <summary>One device that can host work: a worker. Its index is its place in the plan.</summary>
public sealed record WorkerSlot(int Index, string NodeAddress, int Device, string DataEndpoint);

/// <summary>Blocks [First, End) of the model, run by one pipeline stage.</summary>
public sealed record StageRange(int First, int End)
{
    public bool Contains(int block) => block >= First && block < End;
}

/// <summary>
/// Who computes what: the data-parallel × pipeline-parallel layout and where every routed expert lives.
/// A value: the coordinator can replace it at any step boundary (elasticity, rebalancing) and send the
/// new one out; nothing in it refers to actors or sockets.
/// </summary>
/// <param name="Epoch">Generation of the plan; bumps whenever the plan changes, and scopes data-plane tags.</param>
/// <param name="Stages">Block range of each pipeline stage (Pp entries).</param>
/// <param name="ExpertOwner">[moe layer ordinal][expert] → worker index hosting that expert.</param>
public sealed record TrainingPlan(int Epoch, int Dp, int Pp, IReadOnlyList<StageRange> Stages, IReadOnlyList<WorkerSlot> Workers, int[][] ExpertOwner)
{
    public int WorldSize => Workers.Count;
    public int StageOf(int worker) => worker % Pp;
    public int ReplicaOf(int worker) => worker / Pp;
    public int WorkerAt(int replica, int stage) => replica * Pp + stage;
    public int StageOfBlock(int block) => Stages.Select((s, i) => (s, i)).First(t => t.s.Contains(block)).i;

    /// <summary>Workers of one stage across all replicas: the group that all-reduces that stage's dense gradients.</summary>
    public int[] StageGroup(int stage) => Enumerable.Range(0, Dp).Select(d => WorkerAt(d, stage)).ToArray();

    /// <summary>Experts of MoE layer <paramref name="moeOrdinal"/> hosted by <paramref name="worker"/>, ascending.</summary>
    public int[] ExpertsOn(int moeOrdinal, int worker)
        => ExpertOwner[moeOrdinal].Select((w, e) => (w, e)).Where(t => t.w == worker).Select(t => t.e).ToArray();

    /// <summary>
    /// True when only <paramref name="worker"/> ever sends tokens to its own experts of this layer: then the
    /// experts can run inside that worker's autograd graph with no request/reply at all.
    /// </summary>
    public bool ExpertsPrivateTo(int moeOrdinal, int worker, int block)
        => Dp == 1 && StageOf(worker) == StageOfBlock(block);

    /// <summary>
    /// <see cref="ExpertsPrivateTo"/> for the shard of MoE layer <paramref name="moeOrdinal"/> on
    /// <paramref name="worker"/> (MoE layers follow the model's <paramref name="denseLayers"/> dense blocks):
    /// such a shard's experts run in its worker's stage graph, and that stage reports their gradient norm.
    /// </summary>
    public bool ShardIsPrivate(int moeOrdinal, int worker, int denseLayers)
        => ExpertsPrivateTo(moeOrdinal, worker, moeOrdinal + denseLayers);
}

/// <summary>Pure layout maths: how to split layers into stages and spread experts over workers.</summary>
public static class LayoutPlanner
{
    /// <summary>
    /// A plan for <paramref name="workers"/> with pipeline degree <paramref name="pp"/> (which must divide
    /// the worker count); the data-parallel degree is what remains.
    /// </summary>
    public static TrainingPlan Plan(int epoch, IReadOnlyList<WorkerSlot> workers, int pp, ModelOptions model)
    {
        if (workers.Count == 0) throw new ArgumentException("a plan needs at least one worker");
        if (pp <= 0 || workers.Count % pp != 0)
            throw new ArgumentException($"pipeline degree {pp} must divide the number of workers ({workers.Count})");
        if (pp > model.Layers)
            throw new ArgumentException($"pipeline degree {pp} exceeds the number of layers ({model.Layers})");
        var stages = SplitLayers(model.Layers, pp);
        int moeLayers = model.Layers - model.DenseLayers;
        var owner = RoundRobin(moeLayers, model.MoE.RoutedExperts, workers.Count);
        return new TrainingPlan(epoch, workers.Count / pp, pp, stages, workers, owner);
    }

    /// <summary>Contiguous ranges whose sizes differ by at most one, larger ranges first.</summary>
    public static StageRange[] SplitLayers(int layers, int stages)
    {
        var result = new StageRange[stages];
        int start = 0;
        for (int s = 0; s < stages; s++)
        {
            int size = layers / stages + (s < layers % stages ? 1 : 0);
            result[s] = new StageRange(start, start + size);
            start += size;
        }
        return result;
    }

    /// <summary>
    /// Expert e of MoE layer l goes to worker (e + l) mod W: each worker gets ⌊E/W⌋ or ⌈E/W⌉ experts of
    /// every layer, and the offset by layer spreads the extra ones so no worker is always the heavy one.
    /// </summary>
    public static int[][] RoundRobin(int moeLayers, int experts, int workers)
        => Enumerable.Range(0, moeLayers).Select(l => Enumerable.Range(0, experts).Select(e => (e + l) % workers).ToArray()).ToArray();
}
