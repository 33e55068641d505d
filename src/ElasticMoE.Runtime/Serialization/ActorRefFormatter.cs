using Akka.Actor;
using MessagePack;
using MessagePack.Formatters;

namespace ElasticMoE.Runtime.Serialization;

/// <summary>
/// Writes an <see cref="IActorRef"/> as its full path (with the address the receiving side must use) and
/// resolves it back in the receiving system, so messages can carry reply-to references.
/// </summary>
internal sealed class ActorRefFormatter(ExtendedActorSystem system) : IMessagePackFormatter<IActorRef?>
{
    public void Serialize(ref MessagePackWriter writer, IActorRef? value, MessagePackSerializerOptions options)
    {
        if (value is null) writer.WriteNil();
        else if (value.IsNobody()) writer.Write(string.Empty);
        // Uses the transport information Akka.Remote sets while serializing, so a local ref gets this
        // system's remote address, not a path only meaningful inside this process.
        else writer.Write(Akka.Serialization.Serialization.SerializedActorPath(value));
    }

    public IActorRef? Deserialize(ref MessagePackReader reader, MessagePackSerializerOptions options)
    {
        if (reader.TryReadNil()) return null;
        var path = reader.ReadString();
        return string.IsNullOrEmpty(path) ? ActorRefs.Nobody : system.Provider.ResolveActorRef(path);
    }
}
