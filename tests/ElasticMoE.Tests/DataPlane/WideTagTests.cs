using ElasticMoE.Runtime.DataPlane;
using ElasticMoE.Runtime.Engine;
using ElasticMoE.Runtime.Protocol;

namespace ElasticMoE.Tests.DataPlane;

/// <summary>
/// Frame version 2's 128-bit tags over real sockets, with indices past the old 7-bit worker and 8-bit micro-batch
/// and layer fields: each frame reaches the receive of its own tag, including frames whose indices the old
/// fields would have wrapped onto each other.
/// </summary>
public sealed class WideTagTests
{
    // (layer, micro-batch, worker A, worker B): the first ones past the old limits, and what each wraps to in the
    // old widths (mod 256 for layers and micro-batches, mod 128 for workers), which must now be told apart.
    private static readonly (int Layer, int MicroBatch, int WorkerA, int WorkerB)[] Indices =
    [
        (257, 300, 200, 4095),
        (1, 300, 200, 4095),     // layer 257 mod 256
        (257, 44, 200, 4095),    // micro-batch 300 mod 256
        (257, 300, 72, 4095),    // worker 200 mod 128
        (257, 300, 200, 127),    // worker 4095 mod 128
        (1023, 4095, 4095, 0),
    ];

    [Fact]
    public async Task Step_frames_past_the_old_limits_reach_their_own_receives_and_stale_ones_are_fenced()
    {
        await using var cluster = new LoopbackCluster(2);
        var (sender, receiver) = (cluster.Nodes[0], cluster.Nodes[1]);
        var now = new Fence(5, 1234, 1);
        var old = now with { Attempt = 0 };
        using var fence = receiver.Fence(tag => StepTags.IsStale(tag, now));

        // The aborted attempt's frames first, then the live ones, all buffered before any receive is posted.
        foreach (var (l, m, a, b) in Indices)
            await sender.SendAsync(receiver.Endpoint, StepTags.Make(StepTags.Kind.ExpertTokens, old, l, m, a, b), new byte[] { 0xEE });
        for (var i = 0; i < Indices.Length; i++)
        {
            var (l, m, a, b) = Indices[i];
            await sender.SendAsync(receiver.Endpoint, StepTags.Make(StepTags.Kind.ExpertTokens, now, l, m, a, b), new[] { (float)i, l, m, a, b });
        }

        // Received in reverse order: each tag's mailbox holds exactly its own frame.
        for (var i = Indices.Length - 1; i >= 0; i--)
        {
            var (l, m, a, b) = Indices[i];
            using var frame = await receiver.ReceiveAsync(StepTags.Make(StepTags.Kind.ExpertTokens, now, l, m, a, b)).Within();
            Assert.Equal(new[] { (float)i, l, m, a, b }, frame.ToFloatArray());
        }
        Assert.Equal(Indices.Length, receiver.DroppedFrameCount);
        Assert.Equal(0, receiver.BufferedBytes);
        Assert.Equal(0, receiver.LiveFrameCount);
    }

    [Fact]
    public async Task Concurrent_all_reduces_of_layers_257_and_1_do_not_mix_and_end_bit_identical()
    {
        // Layer 257 was refused by the 8-bit collective id; its id must differ from layer 1's (257 mod 256).
        await using var cluster = new LoopbackCluster(3, collectiveOptions: new CollectiveOptions { ChunkBytes = 256 });
        var high = CollectiveTags.CollectiveId(epoch: 2, step: 9, layer: 257, phase: 3);
        var low = CollectiveTags.CollectiveId(epoch: 2, step: 9, layer: 1, phase: 3);
        Assert.NotEqual(high, low);
        var rng = new Random(4);
        float[][] Inputs() => Enumerable.Range(0, 3).Select(_ => Enumerable.Range(0, 1000).Select(_ => (float)rng.Next(-1000, 1000)).ToArray()).ToArray();
        var (a, b) = (Inputs(), Inputs());
        var (ra, rb) = (a.Select(x => (float[])x.Clone()).ToArray(), b.Select(x => (float[])x.Clone()).ToArray());
        await Task.WhenAll(cluster.Groups.SelectMany((g, r) => r % 2 == 0
            ? new[] { g.AllReduceSumAsync(ra[r], high), g.AllReduceSumAsync(rb[r], low) }
            : new[] { g.AllReduceSumAsync(rb[r], low), g.AllReduceSumAsync(ra[r], high) })).Within();

        // Small integers sum exactly in float32, whatever the order: the expected sums are exact.
        for (var r = 0; r < 3; r++)
            for (var i = 0; i < 1000; i++)
            {
                Assert.Equal(a[0][i] + a[1][i] + a[2][i], ra[r][i]);
                Assert.Equal(b[0][i] + b[1][i] + b[2][i], rb[r][i]);
            }
        Assert.All(cluster.Nodes, n => Assert.Equal(0, n.BufferedBytes));
    }

    [Fact]
    public async Task A_group_of_300_members_delivers_point_to_point_by_ranks_past_128()
    {
        // 300 real listening nodes; only the ranks that talk open connections, so this stays cheap.
        await using var cluster = new LoopbackCluster(300);
        var id = CollectiveTags.CollectiveId(epoch: 1, step: 3, layer: 257, phase: 0);
        var senders = new[] { 200, 299, 72, 128 };
        foreach (var rank in senders)
            await cluster.Groups[rank].SendAsync(0, id, new[] { (float)rank });
        foreach (var rank in senders.Reverse())
        {
            using var frame = await cluster.Groups[0].ReceiveAsync(rank, id).Within();
            Assert.Equal(new[] { (float)rank }, frame.ToFloatArray());
            Assert.Equal(rank, frame.Source);
        }
        Assert.Equal(0, cluster.Nodes[0].BufferedBytes);
    }
}
