using ElasticMoE.Runtime.DataPlane;

namespace ElasticMoE.Tests.DataPlane;

public sealed class BackpressureTests
{
    [Fact]
    public async Task A_slow_consumer_stops_the_socket_being_read_instead_of_buffering_everything()
    {
        const int frameBytes = 1 << 20;
        const int frames = 128; // 128 MiB: well past what the kernel's socket buffers can absorb (~36 MiB here)
        const long budget = 2 << 20;
        await using var cluster = new LoopbackCluster(2, new DataPlaneOptions { MaxBufferedBytesPerConnection = budget });
        var (a, b) = (cluster.Nodes[0], cluster.Nodes[1]);

        var payload = new byte[frameBytes];
        var sent = 0;
        var sender = Task.Run(async () =>
        {
            for (var i = 0; i < frames; i++)
            {
                payload[0] = (byte)i; // safe to reuse: SendAsync returns once the kernel has the bytes
                await a.SendAsync(b.Endpoint, 1, payload);
                Interlocked.Increment(ref sent);
            }
        });

        // Wait for the sender to stall: under way, then no progress for a while.
        await TestTimeouts.Eventually(() => Volatile.Read(ref sent) > 0, "the first frame sent");
        var last = -1;
        var deadline = DateTime.UtcNow + TestTimeouts.Default;
        while (Volatile.Read(ref sent) != last && DateTime.UtcNow < deadline)
        {
            last = Volatile.Read(ref sent);
            await Task.Delay(500);
        }
        Assert.False(sender.IsCompleted, "the sender was never held back");
        Assert.True(Volatile.Read(ref sent) < frames);
        Assert.InRange(b.BufferedBytes, 1, budget);

        // Draining resumes the flow, and every frame arrives, in order.
        for (var i = 0; i < frames; i++)
        {
            using var frame = await b.ReceiveAsync(1).Within();
            Assert.Equal((byte)i, frame.Span[0]);
            Assert.InRange(b.BufferedBytes, 0, budget);
        }
        await sender.Within();
        Assert.Equal(0, b.BufferedBytes);
    }

    [Fact]
    public async Task A_frame_larger_than_the_budget_still_gets_through()
    {
        await using var cluster = new LoopbackCluster(2, new DataPlaneOptions { MaxBufferedBytesPerConnection = 1000 });
        var (a, b) = (cluster.Nodes[0], cluster.Nodes[1]);
        await a.SendAsync(b.Endpoint, 1, new byte[5000]);
        await a.SendAsync(b.Endpoint, 2, new byte[5000]);
        using var first = await b.ReceiveAsync(1).Within();
        using var second = await b.ReceiveAsync(2).Within();
        Assert.Equal(5000, second.Length);
    }
}
