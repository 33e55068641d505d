using System.Runtime.Serialization;
using Akka.Actor;
using Akka.Serialization;
using MessagePack;
using MessagePack.Resolvers;

namespace ElasticMoE.Runtime.Journal;

/// <summary>
/// Akka serializer for what the coordinator journals: every <c>ICoordinatorEvent</c> and the
/// <c>CoordinatorState</c> snapshot, as MessagePack of their stored forms (<see cref="CoordinatorJournalCodec"/>).
/// Bound by type in <see cref="Serialization.ElasticMoESerialization.Hocon"/>, so Akka.Persistence uses it
/// for events and snapshots without the actor converting anything.
/// </summary>
/// <remarks>
/// Reading is strict: an unknown manifest, bytes that are not the stored form, trailing bytes or a missing
/// required field each fail with a <see cref="SerializationException"/> that names the manifest and the
/// size, so a damaged journal stops recovery with a reason instead of rebuilding a wrong state.
/// </remarks>
public sealed class CoordinatorJournalSerializer : SerializerWithStringManifest
{
    /// <summary>Part of every stored journal row: never change it.</summary>
    public const int SerializerIdentifier = 118;

    // Standard resolver only (the stored forms hold no actor refs); UntrustedData bounds nesting depth.
    private static readonly MessagePackSerializerOptions Options =
        MessagePackSerializerOptions.Standard.WithResolver(StandardResolver.Instance).WithSecurity(MessagePackSecurity.UntrustedData);

    public CoordinatorJournalSerializer(ExtendedActorSystem system) : base(system) { }

    public override int Identifier => SerializerIdentifier;

    public override string Manifest(object o) => CoordinatorJournalCodec.ManifestOf(o.GetType());

    public override byte[] ToBinary(object obj) => Encode(obj).Bytes;

    public override object FromBinary(byte[] bytes, string manifest) => Decode(bytes, manifest);

    /// <summary>The stored bytes of a coordinator event or state, and their manifest (usable without an actor system).</summary>
    public static (string Manifest, byte[] Bytes) Encode(object domain)
    {
        var (manifest, wire) = CoordinatorJournalCodec.ToWire(domain);
        return (manifest, MessagePackSerializer.Serialize(wire.GetType(), wire, Options));
    }

    /// <summary>Reads stored bytes back into the coordinator event or state.</summary>
    /// <exception cref="SerializationException">Unknown manifest, or bytes that are not a valid record of it.</exception>
    public static object Decode(ReadOnlyMemory<byte> bytes, string manifest)
    {
        var type = CoordinatorJournalCodec.WireTypeOf(manifest) ?? throw new SerializationException(
            $"Unknown coordinator journal record '{manifest}' ({bytes.Length} bytes): known are " +
            $"{string.Join(", ", CoordinatorJournalCodec.WireTypes.Keys)}. The journal was written by a newer ElasticMoE, or it is damaged.");
        try
        {
            var reader = new MessagePackReader(bytes);
            var wire = MessagePackSerializer.Deserialize(type, ref reader, Options)
                ?? throw new InvalidDataException("it decodes to nil");
            if (!reader.End) throw new InvalidDataException($"{bytes.Length - reader.Consumed} bytes follow the record");
            return CoordinatorJournalCodec.ToDomain(manifest, wire);
        }
        catch (Exception ex) when (ex is MessagePackSerializationException or InvalidDataException or FormatException or ArgumentException)
        {
            var reason = ex is MessagePackSerializationException { InnerException: { } inner } ? $"{ex.Message} {inner.Message}" : ex.Message;
            throw new SerializationException($"Corrupt coordinator journal record '{manifest}' ({bytes.Length} bytes): {reason}", ex);
        }
    }
}
