using ElasticMoE.Data;
using ElasticMoE.Runtime.DataPlane;
using ElasticMoE.Training;

namespace ElasticMoE.Tests.DataPlane;

/// <summary>The canonical all-reduce: any number of ranks, any shares, the bits of one process summing the tree.</summary>
public sealed class TreeAllReduceTests
{
    private static float[][] MicroBatchValues(int leaves, int length, int seed)
    {
        var rng = new Random(seed);
        // Mixed magnitudes, so that the grouping changes the bits (checked below).
        return Enumerable.Range(0, leaves)
            .Select(_ => Enumerable.Range(0, length).Select(_ => (float)((rng.NextDouble() - 0.5) * Math.Pow(10, rng.Next(-4, 4)))).ToArray())
            .ToArray();
    }

    private static float[]? Add(float[]? l, float[]? r)
    {
        for (int i = 0; i < l!.Length; i++) l[i] += r![i];
        return l;
    }

    // What one process computes: the whole step's tree.
    private static float[] Reference(float[][] values)
    {
        var acc = new TreeAccumulator<float[]>(values.Length, 0, values.Length, Add);
        for (int m = 0; m < values.Length; m++) acc.Add(m, (float[])values[m].Clone());
        return acc.Root!;
    }

    private static async Task<float[][]> RunAsync(int ranks, float[][] values, int chunkBytes, long id)
    {
        int leaves = values.Length, length = values[0].Length;
        await using var cluster = new LoopbackCluster(ranks, collectiveOptions: new CollectiveOptions { ChunkBytes = chunkBytes });
        var ranges = Enumerable.Range(0, ranks).Select(r => BatchAssignment.RangeFor(r, ranks, leaves)).ToList();
        var results = Enumerable.Range(0, ranks).Select(_ => new float[length]).ToArray();
        await Task.WhenAll(Enumerable.Range(0, ranks).Select(r =>
        {
            var (lo, hi) = ranges[r];
            var acc = new TreeAccumulator<float[]>(leaves, lo, hi, Add);
            for (int m = hi - 1; m >= lo; m--) acc.Add(m, (float[])values[m].Clone());   // any order
            var partials = acc.Partials.Select(p => (p.Node, (Memory<float>)p.Value!)).ToList();
            return cluster.Groups[r].TreeAllReduceAsync(results[r], partials, ranges, leaves, id);
        })).Within();
        Assert.All(cluster.Nodes, n => Assert.Equal(0, n.BufferedBytes));
        return results;
    }

    [Theory]
    [InlineData(2, 12, 10_007, 1 << 20)]   // two partials a rank
    [InlineData(3, 12, 10_007, 1 << 10)]   // aligned shares, many pieces
    [InlineData(4, 12, 3_001, 100)]        // piece size a multiple of nothing
    [InlineData(5, 12, 2, 1 << 10)]        // fewer elements than ranks: empty segments
    [InlineData(3, 2, 1_000, 1 << 10)]     // a rank with no micro-batch
    [InlineData(4, 16, 777, 256)]
    public async Task Every_rank_ends_with_the_single_process_trees_bits(int ranks, int leaves, int length, int chunkBytes)
    {
        var values = MicroBatchValues(leaves, length, seed: ranks * 131 + leaves);
        var expected = Reference(values).Select(BitConverter.SingleToInt32Bits).ToArray();
        var results = await RunAsync(ranks, values, chunkBytes, id: 7);
        for (int r = 0; r < ranks; r++)
            Assert.Equal(expected, results[r].Select(BitConverter.SingleToInt32Bits));
    }

    [Fact]
    public async Task The_ring_would_have_given_other_bits_for_the_same_values()
    {
        // Sanity for the test above: with these values the grouping matters, so bit equality is a real check.
        var values = MicroBatchValues(12, 4096, seed: 3);
        var tree = Reference(values);
        var ranges = Enumerable.Range(0, 3).Select(r => BatchAssignment.RangeFor(r, 3, 12)).ToList();
        var sums = ranges.Select(r => Enumerable.Range(r.Start, r.End - r.Start).Aggregate(new float[4096], (acc, m) => Add(acc, values[m])!)).ToArray();
        await using var cluster = new LoopbackCluster(3);
        await Task.WhenAll(cluster.Groups.Select((g, r) => g.AllReduceSumAsync(sums[r], 1))).Within();
        Assert.NotEqual(tree.Select(BitConverter.SingleToInt32Bits), sums[0].Select(BitConverter.SingleToInt32Bits));
    }

    [Fact]
    public async Task Partials_that_are_not_the_cover_of_the_ranks_share_are_refused()
    {
        await using var cluster = new LoopbackCluster(2);
        var ranges = new List<(int, int)> { (0, 6), (6, 12) };
        var wrong = new List<(TreeNode, Memory<float>)> { (new TreeNode(2, 0), new float[4]) };   // [0,4) alone
        await Assert.ThrowsAsync<ArgumentException>(() => cluster.Groups[0].TreeAllReduceAsync(new float[4], wrong, ranges, 12, 1));
    }
}
