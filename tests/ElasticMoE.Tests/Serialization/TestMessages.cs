using Akka.Actor;
using ElasticMoE.Runtime.Protocol;
using MessagePack;

namespace ElasticMoE.Tests.Serialization;

// Test-only protocol: shaped like the real messages will be (sealed records, explicit keys, manifests).

[MessagePackObject, Manifest("test.ping")]
public sealed record TestPing(
    [property: Key(0)] string Text,
    [property: Key(1)] int Sequence,
    [property: Key(2)] IActorRef? ReplyTo) : IElasticMoEMessage;

[MessagePackObject, Manifest("test.pong")]
public sealed record TestPong(
    [property: Key(0)] string Text,
    [property: Key(1)] int Sequence,
    [property: Key(2)] string ReceivedBy) : IElasticMoEMessage;

[MessagePackObject, Manifest("test.assignment")]
public sealed record TestExpertAssignment(
    [property: Key(0)] long Epoch,
    [property: Key(1)] int[] Experts,
    [property: Key(2)] IReadOnlyDictionary<string, double> Load,
    [property: Key(3)] float[]? Gate,
    [property: Key(4)] DateTimeOffset IssuedAt) : IElasticMoEMessage;

/// <summary>No [Manifest]: travels under its full type name.</summary>
[MessagePackObject]
public sealed class TestUnnamedMessage : IElasticMoEMessage
{
    [Key(0)] public Guid Id { get; set; }
    [Key(1)] public string? Note { get; set; }
}

/// <summary>Not a protocol message: the serializer must refuse it rather than send what no receiver can read.</summary>
[MessagePackObject]
public sealed record NotAMessage([property: Key(0)] int Value);
