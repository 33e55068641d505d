using System.Net.Sockets;
using Akka.Configuration;
using ElasticMoE.Runtime.DataPlane;

namespace ElasticMoE.Tests.DataPlane;

public sealed class AkkaLoggingTests : Akka.TestKit.Xunit2.TestKit
{
    public AkkaLoggingTests() : base(ConfigurationFactory.ParseString("akka.loglevel = DEBUG")) { }

    [Fact]
    public async Task Protocol_errors_reach_the_actor_systems_log()
    {
        await using var node = DataPlaneNode.Start(new DataPlaneOptions().WithAkkaLog(Sys.Log));
        using var raw = new Socket(node.LocalEndPoint.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
        await EventFilter.Warning(contains: "bad magic").ExpectOneAsync(async () =>
        {
            await raw.ConnectAsync(node.LocalEndPoint);
            await raw.SendAsync(new byte[FrameHeader.Size], SocketFlags.None);
            Assert.True(await TestTimeouts.WaitUntilClosedByPeerAsync(raw, TestTimeouts.Default));
        });
    }
}
