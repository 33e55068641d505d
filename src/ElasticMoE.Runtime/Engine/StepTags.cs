namespace ElasticMoE.Runtime.Engine;

/// <summary>
/// Point-to-point data-plane tags of a training step. Collective traffic (bit 62) never meets these.
/// </summary>
/// <remarks>
/// <code>
/// bits 61..58 kind (activation, activation gradient, expert tokens, expert outputs, …)
/// bits 57..50 plan epoch (mod 256)
/// bits 49..30 step (mod 2^20)
/// bits 29..22 MoE layer ordinal or stage
/// bits 21..14 micro-batch (mod 256; validation batches use the eval kinds)
/// bits 13..0  requesting worker (and, for expert traffic, owner worker in bits 13..7 / 6..0)
/// </code>
/// Tags only need to differ between messages that can be in flight together: those of one step (or
/// two neighbouring ones) and one epoch, which these fields tell apart.
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
    }

    public static long Make(Kind kind, int epoch, long step, int layerOrStage, int microBatch, int workerA, int workerB = 0)
    {
        if ((uint)workerA >= 128 || (uint)workerB >= 128) throw new ArgumentOutOfRangeException(nameof(workerA), "at most 128 workers");
        return ((long)kind << 58)
               | ((long)(epoch & 0xFF) << 50)
               | ((step & 0xFFFFF) << 30)
               | ((long)(layerOrStage & 0xFF) << 22)
               | ((long)(microBatch & 0xFF) << 14)
               | ((long)workerA << 7)
               | (long)workerB;
    }
}
