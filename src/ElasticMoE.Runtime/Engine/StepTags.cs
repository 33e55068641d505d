using ElasticMoE.Runtime.DataPlane;
using ElasticMoE.Runtime.Protocol;

namespace ElasticMoE.Runtime.Engine;

/// <summary>
/// Point-to-point data-plane tags of a training step and of a re-plan's unit transfers. Collective
/// traffic (bit 126) never meets these.
/// </summary>
/// <remarks>
/// 128-bit tags (frame version 2, see <see cref="CollectiveTags"/> for why): the upper half says which
/// attempt of which step a frame belongs to, the lower half who sends it where.
/// <code>
/// bits 125..122 kind (activation, activation gradient, expert tokens, expert outputs, unit, …)
/// bits 121..114 plan epoch (mod 256)
/// bits 113..110 attempt (mod 16)
/// bits 109..94  step (mod 2^16)
/// bits 45..36   MoE layer ordinal or stage (0..1023)
/// bits 35..24   micro-batch (0..4095; validation batches use the eval kinds)
/// bits 23..12   requesting worker (0..4095)
/// bits 11..0    for expert traffic, the owner worker (0..4095)
/// unit transfers: bits 42..12 unit index, bits 11..0 receiving rank
/// </code>
/// Tags only need to differ between messages that can be in flight together: those of one attempt (or
/// an aborted attempt's late frames and its redo), which these fields tell apart. The limits (4,096
/// workers, 4,096 micro-batches, 1,024 layers) are checked when the config is read and the plan is made
/// (<c>ElasticMoEConfig</c>, <c>ElasticPlanner</c>), which use the same numbers.
/// </remarks>
public static class StepTags
{
    public enum Kind
    {
        Activation = 1,
        ActivationGrad = 2,
        ExpertTokens = 3,
        ExpertOutputs = 4,
        ExpertOutputGrad = 5,
        ExpertInputGrad = 6,
        EvalActivation = 7,
        EvalExpertTokens = 8,
        EvalExpertOutputs = 9,
        Unit = 10,
        MirrorGradients = 11,
        MirrorAck = 12,
        /// <summary>A replicated expert's partial gradients, from one copy's holder to another's (see <c>ReplicaExchange</c>).</summary>
        ReplicaGradients = 13,
    }

    public const int WorkerBits = 12, MicroBatchBits = 12, LayerBits = 10;
    public const int MaxWorkers = 1 << WorkerBits, MaxMicroBatches = 1 << MicroBatchBits, MaxLayers = 1 << LayerBits;
    private const int WorkerAShift = WorkerBits, MicroBatchShift = 2 * WorkerBits, LayerShift = MicroBatchShift + MicroBatchBits;

    public static Int128 Make(Kind kind, Fence fence, int layerOrStage, int microBatch, int workerA, int workerB = 0)
    {
        if ((uint)workerA >= MaxWorkers || (uint)workerB >= MaxWorkers) throw new ArgumentOutOfRangeException(nameof(workerA), $"at most {MaxWorkers} workers");
        if ((uint)microBatch >= MaxMicroBatches) throw new ArgumentOutOfRangeException(nameof(microBatch), $"at most {MaxMicroBatches} micro-batches");
        if ((uint)layerOrStage >= MaxLayers) throw new ArgumentOutOfRangeException(nameof(layerOrStage), $"at most {MaxLayers} layers");
        ulong low = ((ulong)(uint)layerOrStage << LayerShift)
                    | ((ulong)(uint)microBatch << MicroBatchShift)
                    | ((ulong)(uint)workerA << WorkerAShift)
                    | (uint)workerB;
        return new Int128((ulong)Header(kind, fence), low);
    }

    /// <summary>The tag of one unit sent to <paramref name="toRank"/> while plan <paramref name="epoch"/> is installed.</summary>
    public static Int128 UnitTransfer(int epoch, int unitIndex, int toRank)
    {
        if ((uint)toRank >= MaxWorkers) throw new ArgumentOutOfRangeException(nameof(toRank), $"at most {MaxWorkers} workers");
        ArgumentOutOfRangeException.ThrowIfNegative(unitIndex);
        long high = ((long)Kind.Unit << 58) | ((long)(epoch & 0xFF) << 50);
        return new Int128((ulong)high, ((ulong)(uint)unitIndex << WorkerBits) | (uint)toRank);
    }

    // The upper 64 bits of a step tag.
    private static long Header(Kind kind, Fence fence)
        => ((long)kind << 58)
           | ((long)(fence.Epoch & 0xFF) << 50)
           | ((long)(fence.Attempt & 0xF) << 46)
           | ((fence.Step & 0xFFFF) << 30);

    /// <summary>
    /// True for a step frame (point-to-point or a step collective) of an attempt older than
    /// <paramref name="current"/>: an aborted attempt's late traffic, dropped and its buffer returned.
    /// Wrapped fields compare by signed distance, so frames of later attempts are never taken for stale.
    /// </summary>
    public static bool IsStale(Int128 tag, Fence current)
    {
        int epoch, attempt; long step;
        if (CollectiveTags.IsCollective(tag))
        {
            long id = CollectiveTags.CollectiveIdOf(tag);
            // CollectiveId layout: epoch | step | layer | phase (the stage all-reduce puts the attempt in the phase).
            const int stepShift = CollectiveTags.PhaseBits + CollectiveTags.LayerBits;
            const int epochShift = stepShift + CollectiveTags.StepBits;
            attempt = (int)(id & ((1 << CollectiveTags.PhaseBits) - 1));
            step = (id >> stepShift) & ((1L << CollectiveTags.StepBits) - 1);
            epoch = (int)((id >> epochShift) & ((1L << CollectiveTags.EpochBits) - 1));
            return Older(epoch, step, CollectiveTags.StepBits, attempt, current);
        }
        long high = CollectiveTags.High(tag);
        var kind = (Kind)((high >> 58) & 0xF);
        if (kind == Kind.Unit || kind == 0) return false;
        epoch = (int)((high >> 50) & 0xFF);
        attempt = (int)((high >> 46) & 0xF);
        step = (high >> 30) & 0xFFFF;
        return Older(epoch, step, 16, attempt, current);
    }

    private static bool Older(int epoch, long step, int stepBits, int attempt, Fence current)
    {
        int de = (sbyte)(byte)((current.Epoch & 0xFF) - epoch);
        if (de != 0) return de > 0;
        long mask = (1L << stepBits) - 1, half = 1L << (stepBits - 1);
        long ds = ((current.Step & mask) - step) & mask;
        if (ds != 0) return ds < half;
        int da = ((current.Attempt & 0xF) - attempt) & 0xF;
        return da != 0 && da < 8;
    }
}
