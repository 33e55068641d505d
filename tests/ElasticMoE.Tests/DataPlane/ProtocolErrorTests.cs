using System.Buffers.Binary;
using System.Net.Sockets;
using ElasticMoE.Runtime.DataPlane;

namespace ElasticMoE.Tests.DataPlane;

/// <summary>
/// A peer that breaks the framing must lose only its own connection: the node logs why, closes it, and goes
/// on serving well-behaved peers. Each test speaks to the node through a raw socket.
/// </summary>
public sealed class ProtocolErrorTests
{
    private const long MaxFrame = 1 << 20;

    private static async Task<Socket> ConnectRawAsync(DataPlaneNode node)
    {
        var socket = new Socket(node.LocalEndPoint.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
        await socket.ConnectAsync(node.LocalEndPoint);
        return socket;
    }

    private static byte[] Header(long tag, ElementType type, long[] shape, long length)
    {
        var bytes = new byte[FrameHeader.Size];
        new FrameHeader { Tag = tag, Source = 99, ElementType = type, Shape = shape, PayloadLength = length }.Write(bytes);
        return bytes;
    }

    private static async Task AssertGoodPeerStillServedAsync(DataPlaneNode node)
    {
        await using var good = DataPlaneNode.Start(new DataPlaneOptions { NodeId = 5 });
        var payload = new float[] { 1.5f, 2.5f, 3.5f };
        await good.SendAsync(node.Endpoint, 777, payload);
        using var frame = await node.ReceiveAsync(777).Within();
        Assert.Equal(5, frame.Source);
        Assert.Equal(payload, frame.ToFloatArray());
    }

    private static async Task AssertRejectedAsync(byte[] bytes, string expectedLog)
    {
        var log = new TestLog();
        await using var node = DataPlaneNode.Start(new DataPlaneOptions { MaxFrameBytes = MaxFrame, Log = log.Sink });
        // A second, innocent connection open across the failure must survive it.
        await using var bystander = DataPlaneNode.Start(new DataPlaneOptions { NodeId = 8 });
        await bystander.SendAsync(node.Endpoint, 1, new byte[] { 1 });
        (await node.ReceiveAsync(1).Within()).Dispose();

        using var raw = await ConnectRawAsync(node);
        await raw.SendAsync(bytes, SocketFlags.None);
        Assert.True(await TestTimeouts.WaitUntilClosedByPeerAsync(raw, TestTimeouts.Default), "node did not close the bad connection");
        Assert.Equal(1, node.ProtocolErrorCount);
        Assert.True(log.Contains(expectedLog), $"log lacks '{expectedLog}':{Environment.NewLine}{log}");
        Assert.Contains(log.Lines, l => l.Level == DataPlaneLogLevel.Warning);

        await bystander.SendAsync(node.Endpoint, 2, new byte[] { 2 });
        using (var frame = await node.ReceiveAsync(2).Within()) Assert.Equal(2, frame.Span[0]);
        await AssertGoodPeerStillServedAsync(node);
    }

    [Fact]
    public async Task Garbage_bytes_close_only_that_connection()
    {
        var garbage = new byte[500];
        new Random(1).NextBytes(garbage);
        await AssertRejectedAsync(garbage, "bad magic");
    }

    [Fact]
    public async Task An_oversize_length_closes_the_connection_before_anything_is_allocated()
    {
        // Well-formed in every other respect: only the size is wrong, and no payload follows.
        await AssertRejectedAsync(Header(1, ElementType.UInt8, [MaxFrame + 1], MaxFrame + 1), "exceeds the maximum frame size");
    }

    [Fact]
    public async Task A_header_whose_shape_disagrees_with_its_length_is_rejected()
    {
        await AssertRejectedAsync(Header(1, ElementType.Float32, [10], 41), "does not match");
    }

    [Fact]
    public async Task An_unknown_version_is_rejected()
    {
        var header = Header(1, ElementType.UInt8, [4], 4);
        BinaryPrimitives.WriteUInt16LittleEndian(header.AsSpan(4), 9);
        await AssertRejectedAsync(header, "the peer speaks data-plane frame version 9, this node speaks version 2");
    }

    /// <summary>A frame as a node of the previous build wrote it: version 1, 96 bytes, a 64-bit tag at 16.</summary>
    private static byte[] Version1Frame(long tag, byte[] payload)
    {
        var bytes = new byte[96 + payload.Length];
        var d = bytes.AsSpan();
        BinaryPrimitives.WriteUInt32LittleEndian(d, FrameHeader.Magic);
        BinaryPrimitives.WriteUInt16LittleEndian(d[4..], 1);
        d[6] = (byte)ElementType.UInt8;
        d[8] = 42; // source id
        d[12] = 1; // one dimension
        BinaryPrimitives.WriteInt64LittleEndian(d[16..], tag);
        BinaryPrimitives.WriteInt64LittleEndian(d[24..], payload.Length);
        BinaryPrimitives.WriteInt64LittleEndian(d[32..], payload.Length);
        payload.CopyTo(d[96..]);
        return bytes;
    }

    [Fact]
    public async Task A_peer_speaking_frame_version_1_is_refused_naming_both_versions()
    {
        // 100 bytes in all, fewer than a version-2 header, and the peer then waits: refused from the magic and
        // version alone, not left hanging for 4 bytes that will never come.
        await AssertRejectedAsync(Version1Frame(7, [1, 2, 3, 4]), "the peer speaks data-plane frame version 1, this node speaks version 2");
    }

    [Fact]
    public async Task Frames_before_the_garbage_are_delivered_and_the_rest_of_the_stream_is_dropped()
    {
        var log = new TestLog();
        await using var node = DataPlaneNode.Start(new DataPlaneOptions { MaxFrameBytes = MaxFrame, Log = log.Sink });
        using var raw = await ConnectRawAsync(node);
        var good = Header(3, ElementType.UInt8, [3], 3).Concat(new byte[] { 9, 8, 7 });
        var bad = Enumerable.Repeat((byte)0xAB, FrameHeader.Size);
        var after = Header(4, ElementType.UInt8, [1], 1).Append((byte)1);
        await raw.SendAsync(good.Concat(bad).Concat(after).ToArray(), SocketFlags.None);

        using (var frame = await node.ReceiveAsync(3).Within())
        {
            Assert.Equal(99, frame.Source);
            Assert.Equal(new byte[] { 9, 8, 7 }, frame.ToArray());
        }
        Assert.True(await TestTimeouts.WaitUntilClosedByPeerAsync(raw, TestTimeouts.Default));
        Assert.Equal(1, node.ProtocolErrorCount);
        await Task.Delay(100);
        Assert.Equal(0, node.BufferedBytes); // the frame after the garbage was never read
        await AssertGoodPeerStillServedAsync(node);
    }

    [Fact]
    public async Task A_peer_vanishing_mid_payload_is_logged_and_nothing_is_delivered()
    {
        var log = new TestLog();
        await using var node = DataPlaneNode.Start(new DataPlaneOptions { Log = log.Sink });
        using (var raw = await ConnectRawAsync(node))
        {
            await raw.SendAsync(Header(5, ElementType.UInt8, [1000], 1000).Concat(new byte[10]).ToArray(), SocketFlags.None);
            raw.Shutdown(SocketShutdown.Both);
        }
        await TestTimeouts.Eventually(() => log.Contains("closed after 10 of 1000"), "truncation logged");
        await TestTimeouts.Eventually(() => node.IncomingConnectionCount == 0, "connection released");
        Assert.Equal(0, node.BufferedBytes);
        Assert.Equal(0, node.ProtocolErrorCount);
        await AssertGoodPeerStillServedAsync(node);
    }

    [Fact]
    public async Task A_throwing_logger_does_not_break_the_node()
    {
        await using var node = DataPlaneNode.Start(new DataPlaneOptions { Log = (_, _, _) => throw new InvalidOperationException("logger down") });
        using var raw = await ConnectRawAsync(node);
        await raw.SendAsync(new byte[200], SocketFlags.None);
        Assert.True(await TestTimeouts.WaitUntilClosedByPeerAsync(raw, TestTimeouts.Default));
        await AssertGoodPeerStillServedAsync(node);
    }
}
