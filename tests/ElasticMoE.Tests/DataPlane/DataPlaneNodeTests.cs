using System.Net;
using System.Net.Sockets;
using ElasticMoE.Runtime.DataPlane;

namespace ElasticMoE.Tests.DataPlane;

public sealed class DataPlaneNodeTests
{
    [Fact]
    public async Task Binds_an_ephemeral_loopback_port_and_reports_it()
    {
        await using var node = DataPlaneNode.Start();
        Assert.NotEqual(0, node.LocalEndPoint.Port);
        Assert.Equal(IPAddress.Loopback, node.LocalEndPoint.Address);
        Assert.Equal($"127.0.0.1:{node.LocalEndPoint.Port}", node.Endpoint);
    }

    [Fact]
    public async Task Delivers_payload_and_metadata_whether_the_receive_comes_first_or_second()
    {
        await using var cluster = new LoopbackCluster(2);
        var (a, b) = (cluster.Nodes[0], cluster.Nodes[1]);
        var payload = Enumerable.Range(0, 24).Select(i => (byte)i).ToArray();

        // Receive posted first.
        var early = b.ReceiveAsync(1);
        await a.SendAsync(b.Endpoint, 1, payload, ElementType.Int16, [3, 4]);
        using (var frame = await early.Within())
        {
            Assert.Equal(1, frame.Tag);
            Assert.Equal(0, frame.Source);
            Assert.Equal(ElementType.Int16, frame.ElementType);
            Assert.Equal(new long[] { 3, 4 }, frame.Shape);
            Assert.Equal(payload, frame.ToArray());
            Assert.False(frame.WasCompressed);
        }

        // Frame arrives first and waits in its mailbox.
        await a.SendAsync(b.Endpoint, 2, payload);
        await TestTimeouts.Eventually(() => b.BufferedBytes == payload.Length, "frame buffered");
        using (var frame = await b.ReceiveAsync(2).Within())
        {
            Assert.Equal(new long[] { 24 }, frame.Shape);
            Assert.Equal(payload, frame.ToArray());
        }
        Assert.Equal(0, b.BufferedBytes);
    }

    [Fact]
    public async Task Frames_with_one_tag_arrive_in_send_order_and_tags_do_not_mix()
    {
        await using var cluster = new LoopbackCluster(2);
        var (a, b) = (cluster.Nodes[0], cluster.Nodes[1]);
        for (var i = 0; i < 50; i++)
        {
            await a.SendAsync(b.Endpoint, 10, new float[] { i });
            await a.SendAsync(b.Endpoint, 11, new float[] { -i });
        }
        for (var i = 0; i < 50; i++)
        {
            using var other = await b.ReceiveAsync(11).Within();
            using var frame = await b.ReceiveAsync(10).Within();
            Assert.Equal(i, frame.AsFloats()[0]);
            Assert.Equal(-i, other.AsFloats()[0]);
        }
    }

    [Fact]
    public async Task Large_float_payload_round_trips_exactly_and_bf16_option_halves_precision_not_shape()
    {
        await using var cluster = new LoopbackCluster(2);
        var (a, b) = (cluster.Nodes[0], cluster.Nodes[1]);
        var rng = new Random(3);
        var values = Enumerable.Range(0, 3_000_001).Select(_ => (float)(rng.NextDouble() * 200 - 100)).ToArray();

        var exact = b.ReceiveAsync(5);
        await a.SendAsync(b.Endpoint, 5, values, [3_000_001]);
        using (var frame = await exact.Within())
            Assert.True(frame.AsFloats().SequenceEqual(values));

        var compressed = b.ReceiveAsync(6);
        await a.SendAsync(b.Endpoint, 6, values, [1, 3_000_001], Compression.BFloat16);
        using (var frame = await compressed.Within())
        {
            Assert.True(frame.WasCompressed);
            Assert.Equal(ElementType.Float32, frame.ElementType);
            Assert.Equal(new long[] { 1, 3_000_001 }, frame.Shape);
            var got = frame.AsFloats();
            for (var i = 0; i < values.Length; i++)
                Assert.Equal(BFloat16.ToSingle(BFloat16.FromSingle(values[i])), got[i]);
        }
    }

    [Fact]
    public async Task Empty_payloads_are_frames_too()
    {
        await using var cluster = new LoopbackCluster(2);
        var (a, b) = (cluster.Nodes[0], cluster.Nodes[1]);
        await a.SendAsync(b.Endpoint, 3, ReadOnlyMemory<byte>.Empty);
        await a.SendAsync(b.Endpoint, 4, ReadOnlyMemory<float>.Empty, null, Compression.BFloat16);
        using var bytes = await b.ReceiveAsync(3).Within();
        using var floats = await b.ReceiveAsync(4).Within();
        Assert.Equal(0, bytes.Length);
        Assert.Equal(new long[] { 0 }, floats.Shape);
        Assert.Equal(0, floats.Length);
    }

    [Fact]
    public async Task One_connection_per_direction_is_opened_lazily_and_reused()
    {
        await using var cluster = new LoopbackCluster(2);
        var (a, b) = (cluster.Nodes[0], cluster.Nodes[1]);
        Assert.Equal(0, a.OutgoingConnectionCount);

        await Task.WhenAll(Enumerable.Range(0, 40).Select(i => a.SendAsync(b.Endpoint, 100 + i, new byte[1000])));
        await b.SendAsync(a.Endpoint, 1, new byte[10]);
        for (var i = 0; i < 40; i++) (await b.ReceiveAsync(100 + i).Within()).Dispose();
        (await a.ReceiveAsync(1).Within()).Dispose();

        Assert.Equal(1, a.OutgoingConnectionCount);
        Assert.Equal(1, b.OutgoingConnectionCount);
        Assert.Equal(1, a.IncomingConnectionCount);
        Assert.Equal(1, b.IncomingConnectionCount);
    }

    [Fact]
    public async Task A_cancelled_receive_does_not_swallow_the_next_frame()
    {
        await using var cluster = new LoopbackCluster(2);
        var (a, b) = (cluster.Nodes[0], cluster.Nodes[1]);
        using var cts = new CancellationTokenSource();
        var cancelled = b.ReceiveAsync(9, cts.Token);
        cts.Cancel();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => cancelled);

        await a.SendAsync(b.Endpoint, 9, new byte[] { 42 });
        using var frame = await b.ReceiveAsync(9).Within();
        Assert.Equal(42, frame.Span[0]);
    }

    [Fact]
    public async Task Sending_to_a_dead_endpoint_fails_and_the_node_keeps_working()
    {
        await using var cluster = new LoopbackCluster(2);
        var (a, b) = (cluster.Nodes[0], cluster.Nodes[1]);
        int deadPort;
        using (var probe = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp))
        {
            probe.Bind(new IPEndPoint(IPAddress.Loopback, 0));
            deadPort = ((IPEndPoint)probe.LocalEndPoint!).Port; // bound, never listening: connections are refused
            await Assert.ThrowsAsync<SocketException>(() => a.SendAsync($"127.0.0.1:{deadPort}", 1, new byte[4]).Within());
        }
        await a.SendAsync(b.Endpoint, 1, new byte[4]);
        (await b.ReceiveAsync(1).Within()).Dispose();
        Assert.Equal(1, a.OutgoingConnectionCount);
    }

    [Fact]
    public async Task Reconnects_after_the_peer_restarts_on_the_same_port()
    {
        await using var a = DataPlaneNode.Start();
        var b = DataPlaneNode.Start();
        var endpoint = b.Endpoint;
        await a.SendAsync(endpoint, 1, new byte[4]);
        (await b.ReceiveAsync(1).Within()).Dispose();
        await b.DisposeAsync();
        await TestTimeouts.Eventually(() => a.OutgoingConnectionCount == 0, "the old connection noticed as closed");

        await using var restarted = DataPlaneNode.Start(new DataPlaneOptions { Port = b.LocalEndPoint.Port });
        await a.SendAsync(endpoint, 2, new byte[] { 7 });
        using var frame = await restarted.ReceiveAsync(2).Within();
        Assert.Equal(7, frame.Span[0]);
    }

    [Fact]
    public async Task Disposing_fails_pending_receives_and_frees_buffered_frames()
    {
        await using var a = DataPlaneNode.Start();
        var b = DataPlaneNode.Start();
        var pending = b.ReceiveAsync(1);
        await a.SendAsync(b.Endpoint, 2, new byte[100]);
        await TestTimeouts.Eventually(() => b.BufferedBytes == 100, "frame buffered");
        await b.DisposeAsync();
        await Assert.ThrowsAsync<ObjectDisposedException>(() => pending.Within());
        Assert.Equal(0, b.BufferedBytes);
        await Assert.ThrowsAsync<ObjectDisposedException>(() => b.ReceiveAsync(3));
    }

    [Fact]
    public async Task Rejects_sends_the_peer_would_reject()
    {
        await using var cluster = new LoopbackCluster(2, new DataPlaneOptions { MaxFrameBytes = 1024 });
        var (a, b) = (cluster.Nodes[0], cluster.Nodes[1]);
        await Assert.ThrowsAsync<ArgumentException>(() => a.SendAsync(b.Endpoint, 1, new byte[1025]));
        await Assert.ThrowsAsync<ArgumentException>(() => a.SendAsync(b.Endpoint, 1, new byte[10], ElementType.Float32));
        await Assert.ThrowsAsync<ArgumentException>(() => a.SendAsync(b.Endpoint, 1, new byte[12], ElementType.Float32, [2, 2]));
        Assert.Equal(0, a.OutgoingConnectionCount);
    }

    [Fact]
    public async Task Discarding_buffered_frames_frees_them()
    {
        await using var cluster = new LoopbackCluster(2);
        var (a, b) = (cluster.Nodes[0], cluster.Nodes[1]);
        await a.SendAsync(b.Endpoint, 1, new byte[10]);
        await a.SendAsync(b.Endpoint, 2, new byte[20]);
        await TestTimeouts.Eventually(() => b.BufferedBytes == 30, "both buffered");
        Assert.Equal(1, b.DiscardBuffered(tag => tag == 1));
        Assert.Equal(20, b.BufferedBytes);
        using var kept = await b.ReceiveAsync(2).Within();
        Assert.Equal(20, kept.Length);
    }

    [Fact]
    public async Task Host_names_resolve_to_loopback_for_binding_and_dialling()
    {
        await using var b = DataPlaneNode.Start(new DataPlaneOptions { Host = "localhost" });
        Assert.True(IPAddress.IsLoopback(b.LocalEndPoint.Address));
        Assert.StartsWith("localhost:", b.Endpoint);
        await using var a = DataPlaneNode.Start();
        await a.SendAsync(b.Endpoint, 1, new byte[] { 1 });
        (await b.ReceiveAsync(1).Within()).Dispose();
    }

    [Fact]
    public void Parses_endpoints()
    {
        Assert.Equal(("10.0.0.1", 80), PeerEndpoint.Parse("10.0.0.1:80"));
        Assert.Equal(("::1", 9000), PeerEndpoint.Parse("[::1]:9000"));
        Assert.Equal("[::1]:9000", PeerEndpoint.Format("::1", 9000));
        Assert.Throws<FormatException>(() => PeerEndpoint.Parse("nohost"));
        Assert.Throws<FormatException>(() => PeerEndpoint.Parse("h:0"));
        Assert.Throws<FormatException>(() => PeerEndpoint.Parse("h:x"));
    }
}
