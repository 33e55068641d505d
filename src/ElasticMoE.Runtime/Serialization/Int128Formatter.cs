using MessagePack;
using MessagePack.Formatters;

namespace ElasticMoE.Runtime.Serialization;

/// <summary>
/// Writes an <see cref="Int128"/> (a data-plane tag, see <c>CollectiveTags</c>) as a two-element array, upper
/// then lower 64 bits. MessagePack 2.5 has no formatter of its own for it.
/// </summary>
/// <remarks>
/// Two integers rather than 16 raw bytes so a tag reads as its two halves in a dump, and so a small tag costs
/// a few bytes (MessagePack writes small integers short).
/// </remarks>
internal sealed class Int128Formatter : IMessagePackFormatter<Int128>
{
    public static readonly Int128Formatter Instance = new();

    public void Serialize(ref MessagePackWriter writer, Int128 value, MessagePackSerializerOptions options)
    {
        writer.WriteArrayHeader(2);
        // Bit patterns, not values: unchecked, so a negative tag (never made, but representable) round-trips too.
        writer.Write(unchecked((ulong)(value >> 64)));
        writer.Write(unchecked((ulong)value));
    }

    public Int128 Deserialize(ref MessagePackReader reader, MessagePackSerializerOptions options)
    {
        var count = reader.ReadArrayHeader();
        if (count != 2) throw new MessagePackSerializationException($"An Int128 is written as 2 integers, found an array of {count}.");
        var upper = reader.ReadUInt64();
        var lower = reader.ReadUInt64();
        return new Int128(upper, lower);
    }
}
