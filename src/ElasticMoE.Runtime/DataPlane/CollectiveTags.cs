namespace ElasticMoE.Runtime.DataPlane;

/// <summary>
/// How collectives carve the 64-bit tag space so that concurrent collectives never receive each other's frames.
/// </summary>
/// <remarks>
/// <code>
/// bit  63      0 (tags stay non-negative)
/// bit  62      1 = collective traffic. Tags below 2^62 are free for hand-picked point-to-point use and
///              can never meet a collective's.
/// bits 61..22  collective id (40 bits), chosen by the caller; see <see cref="CollectiveId"/>.
/// bits 21..0   sub-tag, owned by the collective: ring step x chunk for all-reduce, the sending rank for
///              all-to-all and point-to-point.
/// </code>
/// The rule for callers: two collectives may share an id only if the first has finished on every member
/// before the second starts. Deriving the id from (membership epoch, step, layer, phase) guarantees that for
/// a training loop, including a step retried after the membership changed: the epoch differs, so frames
/// still in flight from the abandoned attempt cannot be taken for the retry's. Drop them with a
/// <see cref="DataPlaneNode.Fence"/> over <see cref="BelongsTo"/> (or the attempt's epoch): it catches the
/// frames already buffered and those still on the wire, which <see cref="DataPlaneNode.DiscardBuffered"/> misses.
/// </remarks>
public static class CollectiveTags
{
    public const int SubTagBits = 22;
    public const int CollectiveIdBits = 40;
    public const long CollectiveFlag = 1L << 62;
    public const long MaxCollectiveId = (1L << CollectiveIdBits) - 1;
    public const int MaxSubTag = (1 << SubTagBits) - 1;

    public const int EpochBits = 8, StepBits = 20, LayerBits = 8, PhaseBits = 4;

    /// <summary>
    /// A collective id from where it sits in training. <paramref name="epoch"/> (membership generation) and
    /// <paramref name="step"/> wrap (mod 2^8 and 2^20): only collectives that can be in flight together
    /// must differ, and those are a few steps apart at most. <paramref name="layer"/> (0..255) and
    /// <paramref name="phase"/> (0..15, e.g. dispatch / combine / gradient) must fit.
    /// </summary>
    public static long CollectiveId(long epoch, long step, int layer, int phase)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(epoch);
        ArgumentOutOfRangeException.ThrowIfNegative(step);
        if ((uint)layer >= 1u << LayerBits) throw new ArgumentOutOfRangeException(nameof(layer), layer, $"Layer must be below {1 << LayerBits}.");
        if ((uint)phase >= 1u << PhaseBits) throw new ArgumentOutOfRangeException(nameof(phase), phase, $"Phase must be below {1 << PhaseBits}.");
        var e = epoch & ((1L << EpochBits) - 1);
        var s = step & ((1L << StepBits) - 1);
        return (((e << StepBits | s) << LayerBits | (uint)layer) << PhaseBits) | (uint)phase;
    }

    /// <summary>The wire tag for one message of a collective.</summary>
    public static long Compose(long collectiveId, int subTag)
    {
        if ((ulong)collectiveId > MaxCollectiveId)
            throw new ArgumentOutOfRangeException(nameof(collectiveId), collectiveId, $"Collective ids are 0..{MaxCollectiveId}.");
        if ((uint)subTag > MaxSubTag)
            throw new ArgumentOutOfRangeException(nameof(subTag), subTag, $"Sub-tags are 0..{MaxSubTag}.");
        return CollectiveFlag | collectiveId << SubTagBits | (uint)subTag;
    }

    public static bool IsCollective(long tag) => tag >= 0 && (tag & CollectiveFlag) != 0;

    public static bool BelongsTo(long tag, long collectiveId) =>
        IsCollective(tag) && ((tag & ~CollectiveFlag) >> SubTagBits) == collectiveId;
}
