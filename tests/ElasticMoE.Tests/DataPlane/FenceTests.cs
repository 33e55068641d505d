using ElasticMoE.Runtime.DataPlane;

namespace ElasticMoE.Tests.DataPlane;

public sealed class FenceTests
{
    [Fact]
    public async Task A_fence_drops_the_frames_already_buffered_for_its_tags_and_counts_them()
    {
        await using var cluster = new LoopbackCluster(2);
        var (a, b) = (cluster.Nodes[0], cluster.Nodes[1]);
        await a.SendAsync(b.Endpoint, 1, new byte[10]);
        await a.SendAsync(b.Endpoint, 2, new byte[20]);
        await a.SendAsync(b.Endpoint, 3, new byte[30]);
        await TestTimeouts.Eventually(() => b.BufferedBytes == 60, "all three buffered");

        using var fence = b.Fence(tag => tag <= 2);
        Assert.Equal(2, fence.DroppedWhenRaised);
        Assert.Equal(2, b.DroppedFrameCount);
        Assert.Equal(30, b.BufferedBytes);
        Assert.Equal(1, b.LiveFrameCount); // the dropped frames' buffers went back
        using var kept = await b.ReceiveAsync(3).Within();
        Assert.Equal(30, kept.Length);
    }

    [Fact]
    public async Task A_fence_drops_frames_that_arrive_later_and_gives_their_bytes_back_to_the_connection()
    {
        // A budget of one frame: if dropped frames kept their bytes charged, the connection would stall
        // after the first and the live frame behind them would never be read.
        await using var cluster = new LoopbackCluster(2, new DataPlaneOptions { MaxBufferedBytesPerConnection = 1000 });
        var (a, b) = (cluster.Nodes[0], cluster.Nodes[1]);
        var stale = CollectiveTags.CollectiveId(epoch: 1, step: 7, layer: 0, phase: 0);
        using var fence = b.Fence(tag => CollectiveTags.BelongsTo(tag, stale));
        Assert.Equal(0, fence.DroppedWhenRaised);

        for (var i = 0; i < 10; i++) await a.SendAsync(b.Endpoint, CollectiveTags.Compose(stale, i), new byte[800]);
        await a.SendAsync(b.Endpoint, 99, new byte[800]);
        using (var live = await b.ReceiveAsync(99).Within()) Assert.Equal(800, live.Length);

        Assert.Equal(10, b.DroppedFrameCount);
        Assert.Equal(0, b.BufferedBytes);
        Assert.Equal(0, b.LiveFrameCount);
    }

    [Fact]
    public async Task Receives_of_a_fenced_tag_fail_whether_already_waiting_or_posted_later()
    {
        await using var node = DataPlaneNode.Start();
        var waiting = node.ReceiveAsync(7);
        var other = node.ReceiveAsync(8);
        using var fence = node.Fence(tag => tag == 7);

        var ex = await Assert.ThrowsAsync<FencedTagException>(() => waiting.Within());
        Assert.Equal(7, ex.Tag);
        Assert.IsAssignableFrom<OperationCanceledException>(ex);
        await Assert.ThrowsAsync<FencedTagException>(() => node.ReceiveAsync(7));
        Assert.False(other.IsCompleted);
        Assert.Equal(1, node.PendingReceiveCount);
    }

    [Fact]
    public async Task Lifting_a_fence_delivers_its_tags_again_and_leaves_other_fences_up()
    {
        await using var cluster = new LoopbackCluster(2);
        var (a, b) = (cluster.Nodes[0], cluster.Nodes[1]);
        var first = b.Fence(tag => tag == 1);
        using var second = b.Fence(tag => tag == 2);
        Assert.True(second.Id > first.Id);
        Assert.Equal(2, b.FenceCount);
        first.Dispose();
        first.Dispose(); // idempotent
        Assert.True(first.IsLifted);
        Assert.Equal(1, b.FenceCount);

        await a.SendAsync(b.Endpoint, 2, new byte[5]);
        await a.SendAsync(b.Endpoint, 1, new byte[5]);
        using var frame = await b.ReceiveAsync(1).Within();
        Assert.Equal(1, frame.Tag);
        Assert.Equal(1, b.DroppedFrameCount); // tag 2's frame, sent first on the same connection
        await Assert.ThrowsAsync<FencedTagException>(() => b.ReceiveAsync(2));
    }

    [Fact]
    public async Task A_frame_for_a_cancelled_receive_of_a_fenced_tag_goes_back_to_the_pool()
    {
        await using var cluster = new LoopbackCluster(2);
        var (a, b) = (cluster.Nodes[0], cluster.Nodes[1]);
        using var cts = new CancellationTokenSource();
        var receive = b.ReceiveAsync(4, cts.Token);
        cts.Cancel();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => receive);
        using var fence = b.Fence(tag => tag == 4);
        await a.SendAsync(b.Endpoint, 4, new byte[64]);
        await TestTimeouts.Eventually(() => b.DroppedFrameCount == 1, "the late frame dropped");
        Assert.Equal(0, b.LiveFrameCount);
        Assert.Equal(0, b.BufferedBytes);
    }

    [Fact]
    public async Task Discarding_buffered_frames_counts_them_as_dropped()
    {
        await using var cluster = new LoopbackCluster(2);
        var (a, b) = (cluster.Nodes[0], cluster.Nodes[1]);
        await a.SendAsync(b.Endpoint, 1, new byte[10]);
        await TestTimeouts.Eventually(() => b.BufferedBytes == 10, "buffered");
        Assert.Equal(1, b.DiscardBuffered(tag => tag == 1));
        Assert.Equal(1, b.DroppedFrameCount);
        Assert.Equal(0, b.LiveFrameCount);
    }

    [Fact]
    public async Task A_disposed_node_refuses_new_fences()
    {
        var node = DataPlaneNode.Start();
        await node.DisposeAsync();
        Assert.Throws<ObjectDisposedException>(() => node.Fence(_ => true));
    }
}
