using Akka.Actor;
using Akka.Configuration;
using Akka.Event;
using Akka.Remote;
using Akka.Serialization;
using Akka.TestKit;
using ElasticMoE.Runtime.Protocol;
using ElasticMoE.Runtime.Serialization;
using MessagePackSerializer = ElasticMoE.Runtime.Serialization.MessagePackSerializer;

namespace ElasticMoE.Tests.Serialization;

/// <summary>
/// A message that only a newer peer knows. Deliberately not an <see cref="IElasticMoEMessage"/>: no registry
/// in this process can resolve its manifest, exactly as for a receiver running an older protocol.
/// </summary>
public sealed record FromTheFuture(int X);

/// <summary>
/// The serializer of a "newer" peer: same identifier as <see cref="MessagePackSerializer"/> (117), so on the
/// wire it is indistinguishable from ours; it writes <see cref="FromTheFuture"/> under a manifest the receiver
/// has never heard of, and everything else exactly as the real serializer does (it delegates to one).
/// </summary>
public sealed class FutureProtocolSerializer : SerializerWithStringManifest
{
    public const string FutureManifest = "emoe.from-the-future";

    private readonly MessagePackSerializer _current;
    private long _futureWritten;

    public FutureProtocolSerializer(ExtendedActorSystem system) : base(system)
    {
        _current = new MessagePackSerializer(system);
    }

    public override int Identifier => MessagePackSerializer.SerializerIdentifier;

    /// <summary>How many <see cref="FromTheFuture"/> messages were written (proof the unknown one left the sender).</summary>
    public long FutureWritten => Interlocked.Read(ref _futureWritten);

    /// <summary>Messages written the ordinary way, through the delegated real serializer.</summary>
    public long CurrentWritten => _current.SerializedCount;

    public override string Manifest(object o) => o is FromTheFuture ? FutureManifest : _current.Manifest(o);

    public override byte[] ToBinary(object obj)
    {
        if (obj is not FromTheFuture future) return _current.ToBinary(obj);
        Interlocked.Increment(ref _futureWritten);
        // A plausible MessagePack body ([X]); the receiver must drop it on the manifest alone.
        return global::MessagePack.MessagePackSerializer.Serialize(new[] { future.X });
    }

    public override object FromBinary(byte[] bytes, string manifest) => _current.FromBinary(bytes, manifest);
}

/// <summary>
/// The requirement "an unknown manifest is logged and dropped", over real Akka.Remote TCP on loopback: a peer
/// running a newer protocol sends a message this side cannot read, then an ordinary one on the same association.
/// </summary>
public sealed class UnknownManifestTests : Akka.TestKit.Xunit2.TestKit
{
    private const string Remote = """
        akka.loglevel = WARNING
        akka.actor.provider = remote
        akka.remote.dot-netty.tcp {
          hostname = "127.0.0.1"
          port = 0
        }
        """;

    // The receiver (the TestKit's own system): the production serialization config, nothing else.
    private static readonly Akka.Configuration.Config ReceiverConfig =
        ConfigurationFactory.ParseString(Remote).WithFallback(ElasticMoESerialization.Config);

    // The sender: NOT ElasticMoESerialization.Config. Its one serializer with id 117 is the "newer" one, bound to
    // the marker interface (so ordinary messages go out exactly as from a current node) and to FromTheFuture.
    private static readonly Akka.Configuration.Config SenderConfig = ConfigurationFactory.ParseString(Remote + """

        akka.actor {
          serializers {
            emoe-future = "ElasticMoE.Tests.Serialization.FutureProtocolSerializer, ElasticMoE.Tests"
          }
          serialization-bindings {
            "ElasticMoE.Runtime.Protocol.IElasticMoEMessage, ElasticMoE.Runtime" = emoe-future
            "ElasticMoE.Tests.Serialization.FromTheFuture, ElasticMoE.Tests" = emoe-future
          }
        }
        """);

    private static readonly TimeSpan Wait = TimeSpan.FromSeconds(5);

    private readonly ActorSystem _sender;

    public UnknownManifestTests() : base(ReceiverConfig, "receiver")
    {
        _sender = ActorSystem.Create("sender", SenderConfig);
    }

    /// <summary>Forwards everything it receives to a probe, so the test sees exactly what was delivered.</summary>
    private sealed class Sink : ReceiveActor
    {
        public Sink(IActorRef probe) => ReceiveAny(m => probe.Tell(m));
    }

    [Fact]
    public async Task An_unknown_manifest_from_a_remote_peer_is_logged_and_dropped_and_the_association_survives()
    {
        // Receiver side: the actor the messages are for, a probe for what it gets, a probe for the log and for
        // association drops.
        var delivered = CreateTestProbe();
        var logs = CreateTestProbe();
        Sys.EventStream.Subscribe(logs.Ref, typeof(Warning));
        Sys.EventStream.Subscribe(logs.Ref, typeof(Error));
        var lifecycle = CreateTestProbe();
        Sys.EventStream.Subscribe(lifecycle.Ref, typeof(DisassociatedEvent));
        Sys.ActorOf(Props.Create(() => new Sink(delivered.Ref)), "sink");

        var receiverAddress = ((ExtendedActorSystem)Sys).Provider.DefaultAddress;
        Assert.Equal("127.0.0.1", receiverAddress.Host);

        // The arrangement is what we think it is: different serializers with the same id on the two sides.
        var futureSerializer = Assert.IsType<FutureProtocolSerializer>(_sender.Serialization.FindSerializerFor(new FromTheFuture(1)));
        Assert.Same(futureSerializer, _sender.Serialization.FindSerializerFor(new Shutdown("x")));
        var receiverSerializer = Assert.IsType<MessagePackSerializer>(Sys.Serialization.FindSerializerFor(new Shutdown("x")));
        Assert.Equal(receiverSerializer.Identifier, futureSerializer.Identifier);
        Assert.Throws<System.Runtime.Serialization.SerializationException>(
            () => receiverSerializer.FromBinary([0x91, 0x2a], FutureProtocolSerializer.FutureManifest));

        // A direct remote ref (not an ActorSelection), so the payload travels as itself, not inside a container.
        var sink = await _sender.ActorSelection(new RootActorPath(receiverAddress) / "user" / "sink")
            .ResolveOne(Wait);
        var deserializedBefore = receiverSerializer.DeserializedCount;

        sink.Tell(new FromTheFuture(42));
        sink.Tell(new Shutdown("after the future"));

        // Same association, ordered delivery: had the unknown message been delivered it would arrive first.
        var first = await delivered.ExpectMsgAsync<object>(Wait);
        var shutdown = Assert.IsType<Shutdown>(first);
        Assert.Equal("after the future", shutdown.Reason);
        Assert.True(receiverSerializer.DeserializedCount > deserializedBefore, "the follow-up did not go through the receiver's serializer");
        Assert.Equal(1, futureSerializer.FutureWritten);

        // Logged on the receiver (Akka.Remote's EndpointReader logs a Warning), naming the manifest...
        var logged = await logs.FishForMessageAsync<LogEvent>(
            e => Describe(e).Contains(FutureProtocolSerializer.FutureManifest, StringComparison.Ordinal), Wait);
        Assert.True(logged.LogLevel() >= LogLevel.WarningLevel);
        // ...and the reason is our serializer's, not only Akka's envelope text.
        Assert.Contains($"Unknown ElasticMoE message manifest '{FutureProtocolSerializer.FutureManifest}'", Describe(logged));

        // The association is still alive: a round trip on it works, and nothing was disassociated meanwhile.
        var echo = CreateTestProbe(_sender);
        sink.Tell(new TestPing("still there", 7, echo.Ref));
        var ping = await delivered.ExpectMsgAsync<TestPing>(Wait);
        Assert.Equal(7, ping.Sequence);
        ping.ReplyTo!.Tell(new TestPong(ping.Text, ping.Sequence, "receiver"));
        Assert.Equal("still there", (await echo.ExpectMsgAsync<TestPong>(Wait)).Text);
        await lifecycle.ExpectNoMsgAsync(TimeSpan.FromMilliseconds(100));
        await delivered.ExpectNoMsgAsync(TimeSpan.FromMilliseconds(100));
    }

    /// <summary>The log line as a reader would see it: message and the cause's messages.</summary>
    private static string Describe(LogEvent e)
    {
        var text = e.ToString();
        for (var ex = (e as Error)?.Cause ?? (e as Warning)?.Cause; ex is not null; ex = ex.InnerException)
            text += " | " + ex.Message;
        return text;
    }

    protected override void AfterAll()
    {
        _sender.Terminate().Wait(TimeSpan.FromSeconds(10));
        base.AfterAll();
    }
}
