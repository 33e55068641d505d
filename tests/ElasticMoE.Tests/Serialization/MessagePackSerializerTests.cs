using System.Runtime.Serialization;
using Akka.Actor;
using Akka.Configuration;
using ElasticMoE.Runtime.Protocol;
using ElasticMoE.Runtime.Serialization;
using MessagePackSerializer = ElasticMoE.Runtime.Serialization.MessagePackSerializer;

namespace ElasticMoE.Tests.Serialization;

public sealed class MessagePackSerializerTests : Akka.TestKit.Xunit2.TestKit
{
    public MessagePackSerializerTests() : base(ElasticMoESerialization.Config.WithFallback(ConfigurationFactory.ParseString("akka.loglevel = WARNING")))
    {
    }

    private MessagePackSerializer Serializer => (MessagePackSerializer)Sys.Serialization.FindSerializerForType(typeof(TestPing));

    private T RoundTrip<T>(T message) where T : notnull
    {
        var serializer = Sys.Serialization.FindSerializerFor(message);
        Assert.IsType<MessagePackSerializer>(serializer);
        var bytes = serializer.ToBinary(message);
        var manifest = Akka.Serialization.Serialization.ManifestFor(serializer, message);
        return Assert.IsType<T>(Sys.Serialization.Deserialize(bytes, serializer.Identifier, manifest));
    }

    [Fact]
    public void Every_protocol_message_type_is_bound_to_this_serializer()
    {
        var types = MessageManifestRegistry.Shared.MessageTypes;
        Assert.Contains(typeof(TestPing), types);
        Assert.Contains(typeof(TestUnnamedMessage), types);
        foreach (var type in types)
        {
            var serializer = Sys.Serialization.FindSerializerForType(type);
            Assert.True(serializer is MessagePackSerializer, $"{type} is bound to {serializer.GetType()}");
            Assert.Equal(117, serializer.Identifier);
        }
    }

    [Fact]
    public void Every_registered_message_type_survives_a_round_trip()
    {
        // Catches a message without [MessagePackObject] or [Key]s in a unit test rather than as a dropped
        // remote message. Default-valued instances: constructors are not run, every field is null or zero.
        foreach (var type in MessageManifestRegistry.Shared.MessageTypes)
        {
            var message = System.Runtime.CompilerServices.RuntimeHelpers.GetUninitializedObject(type);
            var bytes = Serializer.ToBinary(message);
            var back = Serializer.FromBinary(bytes, Serializer.Manifest(message));
            Assert.IsType(type, back);
            Assert.Equal(bytes, Serializer.ToBinary(back));
        }
    }

    [Fact]
    public void Expert_requests_carry_their_128_bit_data_plane_tags_whole()
    {
        // Tags of a worker, micro-batch and layer beyond the old 7- and 8-bit fields: both halves must survive.
        var fence = new Fence(3, 70_000, 2);
        var data = ElasticMoE.Runtime.Engine.StepTags.Make(ElasticMoE.Runtime.Engine.StepTags.Kind.ExpertTokens, fence, 1023, 4095, 200, 4095);
        var reply = ElasticMoE.Runtime.Engine.StepTags.Make(ElasticMoE.Runtime.Engine.StepTags.Kind.ExpertOutputs, fence, 257, 300, 4095, 0);
        Assert.NotEqual(0UL, (ulong)(data >> 64));
        var forward = RoundTrip(new ExpertForward(fence, 200, 300, [1, 2], data, reply, "127.0.0.1:1", true));
        Assert.Equal(data, forward.DataTag);
        Assert.Equal(reply, forward.ReplyTag);
        var backward = RoundTrip(new ExpertBackward(fence, 200, 300, reply, data, "127.0.0.1:1"));
        Assert.Equal((reply, data), (backward.DataTag, backward.ReplyTag));
    }

    [Fact]
    public void The_shell_control_messages_round_trip_under_their_manifests()
    {
        var command = new ShellControlCommand("relayout", ["2", "1"], "t0k");
        Assert.Equal("s.ControlCommand", Serializer.Manifest(command));
        var back = RoundTrip(command);
        Assert.Equal((command.Action, command.Token), (back.Action, back.Token));
        Assert.Equal(command.Args, back.Args);
        Assert.Equal("s.NodeLeaveOrder", Serializer.Manifest(new NodeLeaveOrder("x")));
        Assert.Equal(new NodeLeaveOrder("asked to leave"), RoundTrip(new NodeLeaveOrder("asked to leave")));
        Assert.Equal("s.NodeKillOrder", Serializer.Manifest(new NodeKillOrder("x")));
        Assert.Equal(new NodeKillOrder("drill"), RoundTrip(new NodeKillOrder("drill")));
        // A node's process id travels with its registration (kill-worker refuses a node in the coordinator's process).
        var register = new RegisterNode("akka.tcp://elasticmoe@127.0.0.1:4054", ["127.0.0.1:5000"], "m", 1, 7, "fp") { ProcessId = 4242 };
        Assert.Equal(4242, RoundTrip(register).ProcessId);
    }

    [Fact]
    public void Uses_the_manifest_attribute_and_falls_back_to_the_full_name()
    {
        Assert.Equal("test.ping", Serializer.Manifest(new TestPing("x", 1, null)));
        Assert.Equal(typeof(TestUnnamedMessage).FullName, Serializer.Manifest(new TestUnnamedMessage()));
    }

    [Fact]
    public void Round_trips_records_with_collections_nulls_and_actor_refs()
    {
        var ping = RoundTrip(new TestPing("hello", 42, TestActor));
        Assert.Equal("hello", ping.Text);
        Assert.Equal(42, ping.Sequence);
        Assert.Equal(TestActor, ping.ReplyTo);
        Assert.Null(RoundTrip(new TestPing("", 0, null)).ReplyTo);
        Assert.True(RoundTrip(new TestPing("", 0, ActorRefs.Nobody)).ReplyTo!.IsNobody());

        var issued = new DateTimeOffset(2025, 1, 2, 3, 4, 5, TimeSpan.Zero);
        var assignment = RoundTrip(new TestExpertAssignment(7, [3, 1, 4], new Dictionary<string, double> { ["a"] = 0.25, ["b"] = -1e300 }, null, issued));
        Assert.Equal(7, assignment.Epoch);
        Assert.Equal(new[] { 3, 1, 4 }, assignment.Experts);
        Assert.Equal(0.25, assignment.Load["a"]);
        Assert.Equal(-1e300, assignment.Load["b"]);
        Assert.Null(assignment.Gate);
        Assert.Equal(issued, assignment.IssuedAt);
        Assert.Equal(new[] { 1.5f, float.NaN }, RoundTrip(assignment with { Gate = [1.5f, float.NaN] }).Gate);

        var unnamed = new TestUnnamedMessage { Id = Guid.NewGuid(), Note = "n" };
        var back = RoundTrip(unnamed);
        Assert.Equal(unnamed.Id, back.Id);
        Assert.Equal("n", back.Note);
    }

    [Fact]
    public void Unknown_manifest_throws_a_serialization_exception_naming_it()
    {
        var bytes = Serializer.ToBinary(new TestPing("x", 1, null));
        var ex = Assert.Throws<SerializationException>(() => Serializer.FromBinary(bytes, "test.no-such-message"));
        Assert.Contains("test.no-such-message", ex.Message);
        Assert.Contains("Unknown", ex.Message);
    }

    [Fact]
    public void Malformed_bytes_throw_a_serialization_exception()
    {
        var ex = Assert.Throws<SerializationException>(() => Serializer.FromBinary([0xC1, 0x00, 0xFF], "test.ping"));
        Assert.Contains("test.ping", ex.Message);
    }

    [Fact]
    public void Refuses_to_serialize_a_type_no_receiver_could_resolve()
    {
        var ex = Assert.Throws<SerializationException>(() => Serializer.ToBinary(new NotAMessage(1)));
        Assert.Contains(nameof(IElasticMoEMessage), ex.Message);
    }

    [Fact]
    public void A_manifest_claimed_twice_is_refused()
    {
        var registry = new MessageManifestRegistry();
        registry.Register(typeof(TestPing));
        var ex = Assert.Throws<InvalidOperationException>(() => registry.Register(typeof(DuplicatePing)));
        Assert.Contains("test.ping", ex.Message);
        Assert.Throws<SerializationException>(() => registry.Resolve("test.ping"));
    }

    [Fact]
    public void The_hocon_snippet_registers_identifier_117_and_the_interface_binding()
    {
        var config = ElasticMoESerialization.Config;
        Assert.Equal(typeof(MessagePackSerializer).AssemblyQualifiedName!.Split(',')[0],
            config.GetString("akka.actor.serializers.elasticmoe-msgpack").Split(',')[0]);
        Assert.Equal(117, MessagePackSerializer.SerializerIdentifier);
        Assert.Equal(117, Serializer.Identifier);
    }

    // Only reachable through a private registry: its manifest would make the shared one ambiguous.
    [Manifest("test.ping")]
    private sealed record DuplicatePing(int X);
}
