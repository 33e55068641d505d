namespace ElasticMoE.Runtime.DataPlane;

/// <summary>
/// Element type of a frame's payload, as it reaches the consumer.
/// </summary>
/// <remarks>
/// The codes are libtorch's <c>ScalarType</c> numbers, so a tensor's dtype maps onto the wire with a cast
/// and a future peer written against libtorch directly reads the same codes. They are part of the wire
/// format: never renumber one.
/// </remarks>
public enum ElementType : byte
{
    UInt8 = 0,
    Int8 = 1,
    Int16 = 2,
    Int32 = 3,
    Int64 = 4,
    Float16 = 5,
    Float32 = 6,
    Float64 = 7,
    Bool = 11,
    BFloat16 = 15,
}

/// <summary>How float32 values travel; the receiver always gets back what the sender's type says.</summary>
public enum Compression : byte
{
    /// <summary>The payload's bytes as they are.</summary>
    None = 0,

    /// <summary>
    /// Float32 rounded to bfloat16 (round-to-nearest-even) on send and widened back on receive: half the
    /// bytes, 8 significant bits. Only valid for <see cref="ElementType.Float32"/>.
    /// </summary>
    BFloat16 = 1,
}

public static class ElementTypes
{
    /// <summary>Bytes per element; 0 for a code this build does not know.</summary>
    public static int SizeOf(ElementType type) => type switch
    {
        ElementType.UInt8 or ElementType.Int8 or ElementType.Bool => 1,
        ElementType.Int16 or ElementType.Float16 or ElementType.BFloat16 => 2,
        ElementType.Int32 or ElementType.Float32 => 4,
        ElementType.Int64 or ElementType.Float64 => 8,
        _ => 0,
    };

    public static bool IsKnown(ElementType type) => SizeOf(type) != 0;
}
