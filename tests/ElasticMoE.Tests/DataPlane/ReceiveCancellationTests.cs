using System.Net;
using System.Net.Sockets;
using ElasticMoE.Runtime.DataPlane;

namespace ElasticMoE.Tests.DataPlane;

public sealed class ReceiveCancellationTests
{
    [Fact]
    public async Task Cancelled_receives_leave_no_waiters_behind_and_do_not_swallow_later_frames()
    {
        await using var cluster = new LoopbackCluster(2);
        var (a, b) = (cluster.Nodes[0], cluster.Nodes[1]);
        using var cts = new CancellationTokenSource();
        // Many on one tag and one each on many tags: both the waiter lists and the mailboxes must empty.
        var receives = Enumerable.Range(0, 500).Select(i => b.ReceiveAsync(i < 250 ? 1 : 1000 + i, cts.Token)).ToList();
        Assert.Equal(500, b.PendingReceiveCount);
        cts.Cancel();
        foreach (var r in receives) await Assert.ThrowsAnyAsync<OperationCanceledException>(() => r);
        Assert.Equal(0, b.PendingReceiveCount);

        await a.SendAsync(b.Endpoint, 1, new byte[] { 5 });
        using var frame = await b.ReceiveAsync(1).Within();
        Assert.Equal(5, frame.Span[0]);
    }

    [Fact]
    public async Task A_receive_with_an_already_cancelled_token_never_waits()
    {
        await using var node = DataPlaneNode.Start();
        using var cts = new CancellationTokenSource();
        cts.Cancel();
        var receive = node.ReceiveAsync(1, cts.Token);
        Assert.True(receive.IsCanceled);
        Assert.Equal(0, node.PendingReceiveCount);
    }

    [Fact]
    public async Task A_frame_racing_a_cancellation_is_received_exactly_once_and_its_buffer_returned()
    {
        await using var cluster = new LoopbackCluster(2);
        var (a, b) = (cluster.Nodes[0], cluster.Nodes[1]);
        var rng = new Random(17);
        var received = 0;
        for (var i = 0; i < 300; i++)
        {
            using var cts = new CancellationTokenSource();
            var receive = b.ReceiveAsync(i, cts.Token);
            var spin = rng.Next(0, 40_000);
            // The frame lands on the reader thread while another thread cancels: either may come first.
            var cancel = Task.Run(() =>
            {
                Thread.SpinWait(spin);
                cts.Cancel();
            });
            await a.SendAsync(b.Endpoint, i, BitConverter.GetBytes(i));
            await cancel;
            Frame frame;
            try
            {
                frame = await receive.Within();
            }
            catch (OperationCanceledException)
            {
                // Cancelled: then the frame must still be there for the next receive of its tag.
                frame = await b.ReceiveAsync(i).Within();
            }
            using (frame) Assert.Equal(i, BitConverter.ToInt32(frame.Span));
            received++;
        }
        Assert.Equal(300, received);
        Assert.Equal(0, b.PendingReceiveCount);
        Assert.Equal(0, b.BufferedBytes);
        Assert.Equal(0, b.LiveFrameCount);
    }

    [Fact]
    public async Task A_frame_arriving_after_the_token_is_cancelled_but_before_the_receive_is_removed_is_requeued()
    {
        await using var cluster = new LoopbackCluster(2);
        var (a, b) = (cluster.Nodes[0], cluster.Nodes[1]);
        using var cts = new CancellationTokenSource();
        var receive = b.ReceiveAsync(1, cts.Token);
        var pendingWhenFrameLanded = -1;
        // Registered after the receive's own callback, so it runs first (callbacks run newest first): the
        // token is already cancelled, the receive is still waiting, and the frame lands right then.
        cts.Token.Register(() =>
        {
            a.SendAsync(b.Endpoint, 1, new byte[] { 9 }).GetAwaiter().GetResult();
            var deadline = DateTime.UtcNow + TestTimeouts.Default;
            while (b.BufferedBytes == 0 && DateTime.UtcNow < deadline) Thread.Sleep(1);
            pendingWhenFrameLanded = b.PendingReceiveCount;
        });
        Assert.Equal(1, b.PendingReceiveCount);
        await Task.Run(cts.Cancel);

        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => receive.Within());
        Assert.Equal(0, pendingWhenFrameLanded); // the cancelled waiter was passed over, not handed the frame
        Assert.Equal(1, b.BufferedBytes);
        using var frame = await b.ReceiveAsync(1).Within();
        Assert.Equal(9, frame.Span[0]);
        Assert.Equal(0, b.PendingReceiveCount);
    }

    [Fact]
    public async Task Frames_held_by_a_receiver_count_as_live_until_disposed()
    {
        await using var cluster = new LoopbackCluster(2);
        var (a, b) = (cluster.Nodes[0], cluster.Nodes[1]);
        await a.SendAsync(b.Endpoint, 1, new byte[100]);
        await a.SendAsync(b.Endpoint, 2, new byte[100]);
        await TestTimeouts.Eventually(() => b.LiveFrameCount == 2, "both frames buffered");
        var first = await b.ReceiveAsync(1).Within();
        Assert.Equal(2, b.LiveFrameCount);
        first.Dispose();
        first.Dispose(); // twice is harmless and counts once
        Assert.Equal(1, b.LiveFrameCount);
        (await b.ReceiveAsync(2).Within()).Dispose();
        Assert.Equal(0, b.LiveFrameCount);
    }

    [Fact]
    public async Task An_all_to_all_that_fails_to_send_leaves_no_receive_waiting()
    {
        await using var node = DataPlaneNode.Start();
        using var probe = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        probe.Bind(new IPEndPoint(IPAddress.Loopback, 0)); // bound, never listening: connections are refused
        var dead = $"127.0.0.1:{((IPEndPoint)probe.LocalEndPoint!).Port}";
        var group = new CollectiveGroup(node, [node.Endpoint, dead], 0);

        await Assert.ThrowsAsync<SocketException>(() =>
            group.AllToAllAsync(new ReadOnlyMemory<byte>[] { new byte[4], new byte[4] }, collectiveId: 3).Within());
        // Its receive from the dead member was posted first; it must not linger, waiting to swallow a frame.
        await TestTimeouts.Eventually(() => node.PendingReceiveCount == 0, "the abandoned receive removed");
    }

    [Fact]
    public async Task A_cancelled_all_reduce_removes_its_receives()
    {
        await using var cluster = new LoopbackCluster(2, collectiveOptions: new CollectiveOptions { ChunkBytes = 1024 });
        using var cts = new CancellationTokenSource();
        // Only rank 0 takes part, so it waits for frames that never come until it is cancelled.
        var reduce = cluster.Groups[0].AllReduceSumAsync(new float[10_000], collectiveId: 4, cancellationToken: cts.Token);
        await TestTimeouts.Eventually(() => cluster.Nodes[0].PendingReceiveCount > 0, "the all-reduce waiting");
        await TestTimeouts.Eventually(() => cluster.Nodes[1].BufferedBytes > 0, "rank 0's first frames at rank 1");
        cts.Cancel();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => reduce.Within());
        Assert.Equal(0, cluster.Nodes[0].PendingReceiveCount);
        // Drop what rank 0 sent before it was cancelled, as a real abort would.
        Assert.True(cluster.Groups[1].Abandon(4) > 0);
        Assert.Equal(0, cluster.Nodes[1].LiveFrameCount);
    }
}
