using ElasticMoE.Runtime.DataPlane;

namespace ElasticMoE.Tests.DataPlane;

public sealed class CollectiveTests
{
    private static float[][] RandomInputs(int ranks, int length, int seed)
    {
        var rng = new Random(seed);
        return Enumerable.Range(0, ranks)
            .Select(_ => Enumerable.Range(0, length).Select(_ => (float)(rng.NextDouble() * 2 - 1) * 1000f).ToArray())
            .ToArray();
    }

    private static async Task<float[][]> AllReduceAsync(LoopbackCluster cluster, float[][] inputs, long id, Compression compression)
    {
        var buffers = inputs.Select(b => (float[])b.Clone()).ToArray();
        await Task.WhenAll(cluster.Groups.Select((g, r) => g.AllReduceSumAsync(buffers[r], id, compression))).Within();
        return buffers;
    }

    private static void AssertBitIdentical(float[][] buffers)
    {
        for (var r = 1; r < buffers.Length; r++)
            for (var i = 0; i < buffers[0].Length; i++)
                Assert.True(BitConverter.SingleToUInt32Bits(buffers[0][i]) == BitConverter.SingleToUInt32Bits(buffers[r][i]),
                    $"rank {r} element {i}: {buffers[r][i]} vs rank 0 {buffers[0][i]}");
    }

    [Theory]
    [InlineData(2, 10_007, 1 << 10)]    // many pieces per segment
    [InlineData(3, 10_007, 1 << 20)]    // one piece per segment
    [InlineData(4, 3_001, 100)]         // piece size not a multiple of anything
    [InlineData(3, 2, 1 << 10)]         // fewer elements than ranks: some segments empty
    [InlineData(5, 1, 1 << 10)]
    public async Task Ring_all_reduce_sums_and_every_rank_ends_bit_identical(int ranks, int length, int chunkBytes)
    {
        await using var cluster = new LoopbackCluster(ranks, collectiveOptions: new CollectiveOptions { ChunkBytes = chunkBytes });
        var inputs = RandomInputs(ranks, length, seed: ranks * 31 + length);
        var results = await AllReduceAsync(cluster, inputs, id: 1, Compression.None);

        AssertBitIdentical(results);
        for (var i = 0; i < length; i++)
        {
            var exact = inputs.Sum(b => (double)b[i]);
            Assert.True(Math.Abs(results[0][i] - exact) <= 1e-3 * ranks, $"element {i}: {results[0][i]} vs {exact}");
        }
        Assert.All(cluster.Nodes, n => Assert.Equal(0, n.BufferedBytes));
    }

    [Fact]
    public async Task Ring_all_reduce_is_deterministic_across_runs()
    {
        await using var cluster = new LoopbackCluster(3, collectiveOptions: new CollectiveOptions { ChunkBytes = 4096 });
        var inputs = RandomInputs(3, 50_000, seed: 9);
        var first = await AllReduceAsync(cluster, inputs, id: 1, Compression.None);
        var second = await AllReduceAsync(cluster, inputs, id: 2, Compression.None);
        Assert.Equal(first[0].Select(BitConverter.SingleToUInt32Bits), second[0].Select(BitConverter.SingleToUInt32Bits));
    }

    [Fact]
    public async Task Bf16_compressed_all_reduce_is_bit_identical_on_every_rank_and_close_to_the_sum()
    {
        await using var cluster = new LoopbackCluster(3, collectiveOptions: new CollectiveOptions { ChunkBytes = 8192 });
        var inputs = RandomInputs(3, 20_011, seed: 5);
        var results = await AllReduceAsync(cluster, inputs, id: 7, Compression.BFloat16);

        AssertBitIdentical(results);
        var scale = inputs.SelectMany(b => b).Max(Math.Abs);
        for (var i = 0; i < results[0].Length; i++)
        {
            var exact = inputs.Sum(b => (double)b[i]);
            // Each of the n-1 hops and the final rounding costs at most half a bf16 ulp (2^-9 relative).
            Assert.True(Math.Abs(results[0][i] - exact) <= 3 * 4 * scale / 512, $"element {i}: {results[0][i]} vs {exact}");
            Assert.Equal(results[0][i], BFloat16.ToSingle(BFloat16.FromSingle(results[0][i]))); // representable in bf16
        }
    }

    [Fact]
    public async Task Group_of_one_is_a_no_op()
    {
        await using var node = DataPlaneNode.Start();
        var group = new CollectiveGroup(node, [node.Endpoint], 0);
        var buffer = new float[] { 1, 2, 3 };
        await group.AllReduceSumAsync(buffer, 1);
        Assert.Equal(new float[] { 1, 2, 3 }, buffer);
        var frames = await group.AllToAllAsync(new ReadOnlyMemory<byte>[] { new byte[] { 4, 5 } }, 2);
        Assert.Equal(new byte[] { 4, 5 }, frames.Single().ToArray());
        Assert.Equal(0, node.OutgoingConnectionCount);
    }

    [Fact]
    public async Task Concurrent_collectives_with_different_ids_do_not_mix()
    {
        await using var cluster = new LoopbackCluster(3, collectiveOptions: new CollectiveOptions { ChunkBytes = 512 });
        var a = RandomInputs(3, 4_000, seed: 1);
        var b = RandomInputs(3, 4_000, seed: 2);
        var ra = a.Select(x => (float[])x.Clone()).ToArray();
        var rb = b.Select(x => (float[])x.Clone()).ToArray();
        var idA = CollectiveTags.CollectiveId(epoch: 0, step: 10, layer: 1, phase: 0);
        var idB = CollectiveTags.CollectiveId(epoch: 0, step: 10, layer: 2, phase: 0);
        // Opposite start order on different ranks, all in flight together.
        await Task.WhenAll(cluster.Groups.SelectMany((g, r) => r % 2 == 0
            ? new[] { g.AllReduceSumAsync(ra[r], idA), g.AllReduceSumAsync(rb[r], idB) }
            : new[] { g.AllReduceSumAsync(rb[r], idB), g.AllReduceSumAsync(ra[r], idA) })).Within();

        var alone = await AllReduceAsync(cluster, a, id: 99, Compression.None);
        AssertBitIdentical(ra);
        AssertBitIdentical(rb);
        Assert.Equal(alone[0], ra[0]);
    }

    [Fact]
    public async Task Mismatched_buffer_lengths_fail_loudly_instead_of_corrupting()
    {
        await using var cluster = new LoopbackCluster(2);
        var tasks = new[]
        {
            cluster.Groups[0].AllReduceSumAsync(new float[100], 1),
            cluster.Groups[1].AllReduceSumAsync(new float[102], 1),
        };
        foreach (var task in tasks)
        {
            var ex = await Assert.ThrowsAsync<InvalidOperationException>(() => task.Within());
            Assert.Contains("disagree", ex.Message);
        }
    }

    [Fact]
    public async Task All_to_all_delivers_each_ranks_payload_including_empty_ones()
    {
        const int n = 4;
        await using var cluster = new LoopbackCluster(n);
        // Rank s sends to rank d: (d - s) mod 3 copies of the byte s*10+d; so some are empty.
        byte[] Payload(int s, int d) => Enumerable.Repeat((byte)(s * 10 + d), ((d - s) % 3 + 3) % 3 * 1000).ToArray();
        var results = await Task.WhenAll(cluster.Groups.Select((g, s) =>
            g.AllToAllAsync(Enumerable.Range(0, n).Select(d => (ReadOnlyMemory<byte>)Payload(s, d)).ToArray(), 42))).Within();

        for (var d = 0; d < n; d++)
        {
            Assert.Equal(n, results[d].Length);
            for (var s = 0; s < n; s++)
            {
                using var frame = results[d][s];
                Assert.Equal(Payload(s, d), frame.ToArray());
                Assert.Equal(s, frame.Source); // node ids equal ranks in this cluster
            }
        }
        Assert.All(cluster.Nodes, node => Assert.Equal(0, node.BufferedBytes));
    }

    [Fact]
    public async Task Float_all_to_all_with_bf16_rounds_every_entry_the_same_way()
    {
        const int n = 3;
        await using var cluster = new LoopbackCluster(n);
        float[] Payload(int s, int d) => Enumerable.Range(0, 100 + s + d).Select(i => (float)Math.Sqrt(i + s * 7 + d * 3)).ToArray();
        var results = await Task.WhenAll(cluster.Groups.Select((g, s) =>
            g.AllToAllAsync(Enumerable.Range(0, n).Select(d => (ReadOnlyMemory<float>)Payload(s, d)).ToArray(), 43, Compression.BFloat16))).Within();
        for (var d = 0; d < n; d++)
            for (var s = 0; s < n; s++)
            {
                using var frame = results[d][s];
                Assert.Equal(Payload(s, d).Select(v => BFloat16.ToSingle(BFloat16.FromSingle(v))), frame.ToFloatArray());
            }
    }

    [Fact]
    public async Task Point_to_point_helpers_address_by_rank()
    {
        await using var cluster = new LoopbackCluster(3);
        var id = CollectiveTags.CollectiveId(1, 2, 3, 4);
        await cluster.Groups[2].SendAsync(0, id, new float[] { 2f });
        await cluster.Groups[1].SendAsync(0, id, new float[] { 1f });
        using var from1 = await cluster.Groups[0].ReceiveAsync(1, id).Within();
        using var from2 = await cluster.Groups[0].ReceiveAsync(2, id).Within();
        Assert.Equal(1f, from1.AsFloats()[0]);
        Assert.Equal(2f, from2.AsFloats()[0]);
    }

    [Fact]
    public async Task Abandoning_a_collective_frees_its_buffered_frames()
    {
        await using var cluster = new LoopbackCluster(2);
        await cluster.Groups[1].SendAsync(0, 5, new byte[64]);
        await cluster.Groups[1].SendAsync(0, 6, new byte[32]);
        await TestTimeouts.Eventually(() => cluster.Nodes[0].BufferedBytes == 96, "frames buffered");
        Assert.Equal(1, cluster.Groups[0].Abandon(5));
        Assert.Equal(32, cluster.Nodes[0].BufferedBytes);
    }

    [Fact]
    public void Group_validates_its_arguments()
    {
        using var node = DataPlaneNode.Start();
        Assert.Throws<ArgumentException>(() => new CollectiveGroup(node, [], 0));
        Assert.Throws<ArgumentOutOfRangeException>(() => new CollectiveGroup(node, [node.Endpoint], 1));
        Assert.Throws<ArgumentException>(() => new CollectiveGroup(node, [node.Endpoint, node.Endpoint], 0));
    }
}

public sealed class CollectiveTagTests
{
    [Fact]
    public void Tags_of_different_collectives_and_sub_tags_never_collide()
    {
        var seen = new HashSet<Int128>();
        for (var step = 0; step < 4; step++)
            foreach (var layer in new[] { 0, 1, 255, 256, 1023 })
                for (var phase = 0; phase < 3; phase++)
                {
                    var id = CollectiveTags.CollectiveId(epoch: 1, step, layer, phase);
                    foreach (var sub in new[] { 0, 1, 4095, 4096, CollectiveTags.MaxSubTag })
                    {
                        var tag = CollectiveTags.Compose(id, sub);
                        Assert.True(seen.Add(tag));
                        Assert.True(CollectiveTags.IsCollective(tag));
                        Assert.True(CollectiveTags.BelongsTo(tag, id));
                        Assert.False(CollectiveTags.BelongsTo(tag, id + 1));
                    }
                }
        Assert.NotEqual(CollectiveTags.CollectiveId(0, 5, 0, 0), CollectiveTags.CollectiveId(1, 5, 0, 0));
    }

    [Fact]
    public void Hand_picked_point_to_point_tags_are_outside_the_collective_space()
    {
        Assert.False(CollectiveTags.IsCollective(12345));
        Assert.False(CollectiveTags.IsCollective((1L << 62) - 1));
        Assert.False(CollectiveTags.IsCollective(long.MaxValue));
        Assert.False(CollectiveTags.IsCollective((Int128.One << 126) - 1));
        Assert.True(CollectiveTags.Compose(CollectiveTags.MaxCollectiveId, CollectiveTags.MaxSubTag) > 0);
    }

    [Fact]
    public void Out_of_range_parts_are_refused()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => CollectiveTags.Compose(CollectiveTags.MaxCollectiveId + 1, 0));
        Assert.Throws<ArgumentOutOfRangeException>(() => CollectiveTags.Compose(0, -1));
        Assert.Throws<ArgumentOutOfRangeException>(() => CollectiveTags.CollectiveId(0, 0, 1024, 0));
        Assert.NotEqual(CollectiveTags.CollectiveId(0, 0, 1023, 0), CollectiveTags.CollectiveId(0, 0, 255, 0));
        Assert.Throws<ArgumentOutOfRangeException>(() => CollectiveTags.CollectiveId(0, 0, 0, 16));
        // Epoch and step wrap instead of failing a long run.
        Assert.Equal(CollectiveTags.CollectiveId(0, 3, 0, 0), CollectiveTags.CollectiveId(256, 3 + (1L << 20), 0, 0));
    }
}
