namespace ElasticMoE.Runtime.DataPlane;

/// <summary>
/// How collectives carve the 128-bit tag space so that concurrent collectives never receive each other's frames.
/// </summary>
/// <remarks>
/// <code>
/// bit  127      0 (tags stay non-negative)
/// bit  126      1 = collective traffic. Tags without it are free for point-to-point use (<c>StepTags</c>)
///               and can never meet a collective's.
/// bits 125..106 zero
/// bits 105..64  collective id (42 bits), chosen by the caller; see <see cref="CollectiveId"/>.
/// bits 63..31   zero
/// bits 30..0    sub-tag, owned by the collective: ring step x chunk for all-reduce, the sending rank for
///               all-to-all and point-to-point.
/// </code>
/// Why 128 bits (frame version 2) and not a tighter 64-bit packing: a step's point-to-point tag must tell apart
/// two workers of 4,096 (12 bits each), a micro-batch of 4,096 (12) and a layer of 1,024 (10) besides the kind,
/// plan epoch, attempt and step that keep a retried step's frames apart (32 bits): 78 bits, which no longer fit
/// 62. <see cref="Int128"/> is a value type with hashing and bit operations built in, so mailboxes key on it as
/// they did on a long, and the header grows by 8 bytes only. The id sits in the upper half and the sub-tag in
/// the lower, so either is one shift or one truncation away and a collective with 4,096 members still has
/// room for 2^31 / 8,190 = 262,000 chunks of ring traffic.
/// <para>
/// The rule for callers: two collectives may share an id only if the first has finished on every member
/// before the second starts. Deriving the id from (membership epoch, step, layer, phase) guarantees that for
/// a training loop, including a step retried after the membership changed: the epoch differs, so frames
/// still in flight from the abandoned attempt cannot be taken for the retry's. Drop them with a
/// <see cref="DataPlaneNode.Fence"/> over <see cref="BelongsTo"/> (or the attempt's epoch): it catches the
/// frames already buffered and those still on the wire, which <see cref="DataPlaneNode.DiscardBuffered"/> misses.
/// </para>
/// </remarks>
public static class CollectiveTags
{
    public const int SubTagBits = 31;
    public const int CollectiveIdBits = 42;
    /// <summary>The collective flag as it sits in the upper 64 bits of a tag (bit 126 of the whole).</summary>
    public const long CollectiveFlagHigh = 1L << 62;
    public const long MaxCollectiveId = (1L << CollectiveIdBits) - 1;
    public const int MaxSubTag = int.MaxValue;

    public const int EpochBits = 8, StepBits = 20, LayerBits = 10, PhaseBits = 4;

    /// <summary>Layers (or pipeline stages) a collective id can name: 1,024.</summary>
    public const int MaxLayers = 1 << LayerBits;

    /// <summary>
    /// A collective id from where it sits in training. <paramref name="epoch"/> (membership generation) and
    /// <paramref name="step"/> wrap (mod 2^8 and 2^20): only collectives that can be in flight together
    /// must differ, and those are a few steps apart at most. <paramref name="layer"/> (0..1023) and
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
    public static Int128 Compose(long collectiveId, int subTag)
    {
        if ((ulong)collectiveId > MaxCollectiveId)
            throw new ArgumentOutOfRangeException(nameof(collectiveId), collectiveId, $"Collective ids are 0..{MaxCollectiveId}.");
        if (subTag < 0)
            throw new ArgumentOutOfRangeException(nameof(subTag), subTag, $"Sub-tags are 0..{MaxSubTag}.");
        return new Int128((ulong)(CollectiveFlagHigh | collectiveId), (ulong)subTag);
    }

    public static bool IsCollective(Int128 tag) => tag >= 0 && (High(tag) & CollectiveFlagHigh) != 0;

    /// <summary>The collective id of a collective tag (meaningless for others: check <see cref="IsCollective"/>).</summary>
    public static long CollectiveIdOf(Int128 tag) => High(tag) & ~CollectiveFlagHigh;

    public static bool BelongsTo(Int128 tag, long collectiveId) => IsCollective(tag) && CollectiveIdOf(tag) == collectiveId;

    /// <summary>Bits 127..64 of a tag.</summary>
    public static long High(Int128 tag) => (long)(tag >> 64);

    /// <summary>Bits 63..0 of a tag.</summary>
    public static ulong Low(Int128 tag) => (ulong)(tag & ulong.MaxValue);
}
