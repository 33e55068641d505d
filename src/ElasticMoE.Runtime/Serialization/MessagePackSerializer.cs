using System.Runtime.Serialization;
using Akka.Actor;
using Akka.Configuration;
using Akka.Serialization;
using MessagePack;
using MessagePack.Formatters;
using MessagePack.Resolvers;
using ElasticMoE.Runtime.Protocol;

namespace ElasticMoE.Runtime.Serialization;

/// <summary>
/// Akka serializer for every <see cref="IElasticMoEMessage"/>: MessagePack with explicit keys, a short
/// manifest per type.
/// </summary>
/// <remarks>
/// Why MessagePack with explicit [Key]s: the wire format is then declared in the message types themselves,
/// compact (field indices, not names), and tolerant of added fields; and deserialization only ever builds
/// types from the <see cref="MessageManifestRegistry"/>, never one named by the sender, unlike the
/// reflection-based fallbacks. Register it with <see cref="ElasticMoESerialization.Config"/>.
/// </remarks>
public sealed class MessagePackSerializer : SerializerWithStringManifest
{
    /// <summary>Akka reserves 0..100 for itself; this id is part of the wire format, never change it.</summary>
    public const int SerializerIdentifier = 117;

    private readonly MessagePackSerializerOptions _options;
    private readonly MessageManifestRegistry _registry;
    private long _serialized;
    private long _deserialized;

    public MessagePackSerializer(ExtendedActorSystem system) : this(system, MessageManifestRegistry.Shared) { }

    public MessagePackSerializer(ExtendedActorSystem system, MessageManifestRegistry registry) : base(system)
    {
        _registry = registry;
        // Fail at actor-system start-up, not on the first message of the ambiguous type mid-run.
        _registry.ThrowIfConflicts();
        var resolver = CompositeResolver.Create(
            new IMessagePackFormatter[] { new ActorRefFormatter(system), Int128Formatter.Instance },
            new IFormatterResolver[] { StandardResolver.Instance });
        // UntrustedData: bounded nesting depth and collision-resistant hashing for maps read off the network.
        _options = MessagePackSerializerOptions.Standard.WithResolver(resolver).WithSecurity(MessagePackSecurity.UntrustedData);
    }

    public override int Identifier => SerializerIdentifier;

    /// <summary>Messages written by this instance (diagnostics, and proof in tests that it was used).</summary>
    public long SerializedCount => Interlocked.Read(ref _serialized);

    /// <summary>Messages read by this instance.</summary>
    public long DeserializedCount => Interlocked.Read(ref _deserialized);

    public override string Manifest(object o) => _registry.ManifestFor(o.GetType());

    public override byte[] ToBinary(object obj)
    {
        var type = obj.GetType();
        _registry.ManifestFor(type); // refuse what the receiver could not resolve
        var bytes = global::MessagePack.MessagePackSerializer.Serialize(type, obj, _options);
        Interlocked.Increment(ref _serialized);
        return bytes;
    }

    public override object FromBinary(byte[] bytes, string manifest)
    {
        var type = _registry.Resolve(manifest);
        try
        {
            var message = global::MessagePack.MessagePackSerializer.Deserialize(type, bytes, _options)
                ?? throw new SerializationException($"Message '{manifest}' deserialized to null.");
            Interlocked.Increment(ref _deserialized);
            return message;
        }
        catch (MessagePackSerializationException ex)
        {
            throw new SerializationException($"Malformed ElasticMoE message '{manifest}' ({bytes.Length} bytes): {ex.Message}", ex);
        }
    }
}

/// <summary>
/// The Akka configuration that routes every ElasticMoE message through <see cref="MessagePackSerializer"/>,
/// and what the coordinator journals (its events and state) through <see cref="Journal.CoordinatorJournalSerializer"/>.
/// </summary>
public static class ElasticMoESerialization
{
    public const string SerializerName = "elasticmoe-msgpack";

    /// <summary>
    /// Binding the marker interface (not each type) means a new message needs no config change, and Akka
    /// picks the most specific binding, so no message of ours falls to the object-level default serializer.
    /// </summary>
    public const string Hocon = """
        akka.actor {
          serializers {
            elasticmoe-msgpack = "ElasticMoE.Runtime.Serialization.MessagePackSerializer, ElasticMoE.Runtime"
            elasticmoe-journal = "ElasticMoE.Runtime.Journal.CoordinatorJournalSerializer, ElasticMoE.Runtime"
          }
          serialization-bindings {
            "ElasticMoE.Runtime.Protocol.IElasticMoEMessage, ElasticMoE.Runtime" = elasticmoe-msgpack
            "ElasticMoE.Runtime.Coordination.ICoordinatorEvent, ElasticMoE.Runtime" = elasticmoe-journal
            "ElasticMoE.Runtime.Coordination.CoordinatorState, ElasticMoE.Runtime" = elasticmoe-journal
          }
          serialization-identifiers {
            "ElasticMoE.Runtime.Serialization.MessagePackSerializer, ElasticMoE.Runtime" = 117
            "ElasticMoE.Runtime.Journal.CoordinatorJournalSerializer, ElasticMoE.Runtime" = 118
          }
        }
        """;

    // Qualified: ElasticMoE.Config (the training config namespace) would shadow Akka's Config type here.
    public static Akka.Configuration.Config Config { get; } = ConfigurationFactory.ParseString(Hocon);
}
