using Akka.Actor;
using Akka.Configuration;
using ElasticMoE.Runtime.Serialization;
using MessagePackSerializer = ElasticMoE.Runtime.Serialization.MessagePackSerializer;

namespace ElasticMoE.Tests.Serialization;

/// <summary>Two actor systems talking over Akka.Remote on loopback: messages really cross a socket.</summary>
public sealed class RemoteSerializationTests : Akka.TestKit.Xunit2.TestKit
{
    private static readonly Akka.Configuration.Config RemoteConfig = ConfigurationFactory.ParseString("""
        akka.loglevel = WARNING
        akka.actor.provider = remote
        akka.remote.dot-netty.tcp {
          hostname = "127.0.0.1"
          port = 0
        }
        """).WithFallback(ElasticMoESerialization.Config);

    private readonly ActorSystem _other;

    public RemoteSerializationTests() : base(RemoteConfig, "local")
    {
        _other = ActorSystem.Create("remote", RemoteConfig);
    }

    private sealed class Responder : ReceiveActor
    {
        public Responder()
        {
            // The reply goes back through the serializer as well, to an actor ref that came in the message.
            Receive<TestPing>(ping => ping.ReplyTo!.Tell(new TestPong(ping.Text, ping.Sequence, Self.Path.ToString())));
        }
    }

    [Fact]
    public void A_message_to_a_remote_actor_goes_through_the_messagepack_serializer_and_arrives_intact()
    {
        _other.ActorOf(Props.Create(() => new Responder()), "responder");
        var remoteAddress = ((ExtendedActorSystem)_other).Provider.DefaultAddress;
        Assert.Equal("127.0.0.1", remoteAddress.Host);

        var ping = new TestPing("über-gradient ✓", 1234, TestActor);
        var localSerializer = Assert.IsType<MessagePackSerializer>(Sys.Serialization.FindSerializerFor(ping));
        var remoteSerializer = Assert.IsType<MessagePackSerializer>(_other.Serialization.FindSerializerFor(ping));
        var (sentBefore, receivedBefore) = (localSerializer.SerializedCount, remoteSerializer.DeserializedCount);

        Sys.ActorSelection(new RootActorPath(remoteAddress) / "user" / "responder").Tell(ping);

        var pong = ExpectMsg<TestPong>(TimeSpan.FromSeconds(15));
        Assert.Equal("über-gradient ✓", pong.Text);
        Assert.Equal(1234, pong.Sequence);
        Assert.Contains("remote", pong.ReceivedBy);
        Assert.True(localSerializer.SerializedCount > sentBefore, "the ping did not go through the local serializer");
        Assert.True(remoteSerializer.DeserializedCount > receivedBefore, "the ping did not go through the remote serializer");
        Assert.True(localSerializer.DeserializedCount > 0, "the pong did not come back through the serializer");
    }

    protected override void AfterAll()
    {
        _other.Terminate().Wait(TimeSpan.FromSeconds(10));
        base.AfterAll();
    }
}
