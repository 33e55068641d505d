using ElasticMoE.Runtime.DataPlane;
using ElasticMoE.Runtime.Protocol;

namespace ElasticMoE.Runtime.Engine;

/// <summary>
/// Point-to-point data-plane tags of a training step and of a re-plan's unit transfers. Collective
/// traffic (bit 62) never meets these.
/// </summary>
/// <remarks>
/// <code>
/// bits 61..58 kind (activation, activation gradient, expert tokens, expert outputs, unit, …)
/// bits 57..50 plan epoch (mod 256)
/// bits 49..46 attempt (mod 16)
/// bits 45..30 step (mod 2^16)
/// bits 29..22 MoE layer ordinal or stage
/// bits 21..14 micro-batch (0..255; validation batches use the eval kinds)
/// bits 13..0  requesting worker (and, for expert traffic, owner worker in bits 13..7 / 6..0)
/// unit transfers: bits 45..7 unit index, bits 6..0 receiving rank
/// </code>
/// Tags only need to differ between messages that can be in flight together: those of one attempt (or
/// an aborted attempt's late frames and its redo), which these fields tell apart. The limits (128
/// workers, 256 micro-batches and layers) are checked when the config is read and the plan is made.
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

    public const int MaxWorkers = 128, MaxMicroBatches = 256, MaxLayers = 256;

    public static long Make(Kind kind, Fence fence, int layerOrStage, int microBatch, int workerA, int workerB = 0)
    {
        if ((uint)workerA >= MaxWorkers || (uint)workerB >= MaxWorkers) throw new ArgumentOutOfRangeException(nameof(workerA), $"at most {MaxWorkers} workers");
        if ((uint)microBatch >= MaxMicroBatches) throw new ArgumentOutOfRangeException(nameof(microBatch), $"at most {MaxMicroBatches} micro-batches");
        if ((uint)layerOrStage >= MaxLayers) throw new ArgumentOutOfRangeException(nameof(layerOrStage), $"at most {MaxLayers} layers");
        return Header(kind, fence)
               | ((long)layerOrStage << 22)
               | ((long)microBatch << 14)
               | ((long)workerA << 7)
               | (long)workerB;
    }

    /// <summary>The tag of one unit sent to <paramref name="toRank"/> while plan <paramref name="epoch"/> is installed.</summary>
    public static long UnitTransfer(int epoch, int unitIndex, int toRank)
    {
        if ((uint)toRank >= MaxWorkers) throw new ArgumentOutOfRangeException(nameof(toRank), $"at most {MaxWorkers} workers");
        return ((long)Kind.Unit << 58) | ((long)(epoch & 0xFF) << 50) | ((long)unitIndex << 7) | (long)toRank;
    }

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
    public static bool IsStale(long tag, Fence current)
    {
        int epoch, attempt; long step;
        if (CollectiveTags.IsCollective(tag))
        {
            long id = (tag & ~CollectiveTags.CollectiveFlag) >> CollectiveTags.SubTagBits;
            // CollectiveId layout: epoch 8 | step 20 | layer 8 | phase 4 (the stage all-reduce puts the attempt in the phase).
            attempt = (int)(id & 0xF);
            step = (id >> 12) & 0xFFFFF;
            epoch = (int)((id >> 32) & 0xFF);
            return Older(epoch, step, 20, attempt, current);
        }
        var kind = (Kind)((tag >> 58) & 0xF);
        if (kind == Kind.Unit || kind == 0) return false;
        epoch = (int)((tag >> 50) & 0xFF);
        attempt = (int)((tag >> 46) & 0xF);
        step = (tag >> 30) & 0xFFFF;
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
