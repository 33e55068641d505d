using ElasticMoE.Data;
using static TorchSharp.torch;

namespace ElasticMoE.Tests.Data;

public class BatchSamplerTests
{
    private static BatchSampler Sampler()
    {
        TestSupport.EnsureTorch();
        return new BatchSampler(TextCorpus.Default(0.1, 32), seed: 42, context: 32);
    }

    /// <summary>The global batch of a step as assembled by <paramref name="world"/> data-parallel workers.</summary>
    private static long[] GlobalBatch(BatchSampler s, long step, int world, int microBatches, int microBatch)
    {
        var rows = new SortedDictionary<int, long[]>();
        for (int rank = 0; rank < world; rank++)
            foreach (var m in BatchAssignment.MicroBatchesFor(rank, world, microBatches))
            {
                var (x, y) = s.TrainBatch(step, m * microBatch, microBatch);
                rows[m] = x.data<long>().ToArray();
                x.Dispose();
                y.Dispose();
            }
        return rows.Values.SelectMany(r => r).ToArray();
    }

    [Fact]
    public void The_global_batch_is_the_same_for_one_two_and_three_workers()
    {
        var s = Sampler();
        foreach (long step in new long[] { 0, 1, 17 })
        {
            var one = GlobalBatch(s, step, 1, 6, 4);
            Assert.Equal(one, GlobalBatch(s, step, 2, 6, 4));
            Assert.Equal(one, GlobalBatch(s, step, 3, 6, 4));
        }
    }

    [Fact]
    public void Batches_are_a_function_of_seed_and_step()
    {
        var a = Sampler();
        var b = Sampler();
        Assert.Equal(a.TrainOffset(5, 3), b.TrainOffset(5, 3));
        Assert.NotEqual(a.TrainOffset(5, 3), a.TrainOffset(6, 3));
        Assert.NotEqual(a.TrainOffset(5, 3), new BatchSampler(a.Corpus, 43, 32).TrainOffset(5, 3));
    }

    [Fact]
    public void Targets_are_inputs_shifted_by_one_byte()
    {
        var s = Sampler();
        var (x, y) = s.TrainBatch(3, 0, 2);
        var xs = x.data<long>().ToArray();
        var ys = y.data<long>().ToArray();
        for (int i = 0; i < 31; i++) Assert.Equal(xs[i + 1], ys[i]);
        Assert.Equal(new long[] { 2, 32 }, x.shape);
    }

    [Theory]
    [InlineData(7, 3)]
    [InlineData(4, 4)]
    [InlineData(2, 5)]
    public void Micro_batch_assignment_covers_each_micro_batch_once(int microBatches, int world)
    {
        var all = Enumerable.Range(0, world).SelectMany(r => BatchAssignment.MicroBatchesFor(r, world, microBatches)).ToList();
        Assert.Equal(Enumerable.Range(0, microBatches), all.Order());
        var sizes = Enumerable.Range(0, world).Select(r => BatchAssignment.MicroBatchesFor(r, world, microBatches).Length).ToList();
        Assert.True(sizes.Max() - sizes.Min() <= 1);
    }

    [Fact]
    public void Default_corpus_is_generated_identically_every_time_and_is_text()
    {
        var a = DefaultCorpus.Generate();
        Assert.Equal(a, DefaultCorpus.Generate());
        Assert.True(a.Length >= 500_000);
        Assert.All(a.Take(10_000), b => Assert.True(b == '\n' || (b >= 32 && b < 127)));
    }

    [Fact]
    public void A_missing_data_file_is_a_clear_error()
    {
        var ex = Assert.Throws<FileNotFoundException>(() => TextCorpus.FromFile("/nonexistent/corpus.txt", 0.1, 16));
        Assert.Contains("/nonexistent/corpus.txt", ex.Message);
    }

    [Fact]
    public void A_file_too_small_for_the_context_is_a_clear_error()
    {
        var ex = Assert.Throws<InvalidDataException>(() => TextCorpus.FromText("tiny", "hello", 0.1, 16));
        Assert.Contains("too small", ex.Message);
    }
}
