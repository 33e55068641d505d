using TorchSharp;
using static TorchSharp.torch;

namespace ElasticMoE.Data;

/// <summary>
/// Which tokens form each sequence of each step. Sequence j of step s starts at an offset that is a pure
/// function of (seed, s, j): any worker can build any micro-batch without coordination, and the global
/// batch is the same however many workers share it.
/// </summary>
public sealed class BatchSampler(TextCorpus corpus, long seed, int context)
{
    private const ulong ValidationStream = 0x5A11DA7EUL;

    public TextCorpus Corpus => corpus;
    public int Context => context;

    /// <summary>Start of training sequence <paramref name="sequence"/> (index within the global batch) of step <paramref name="step"/>.</summary>
    public long TrainOffset(long step, int sequence)
        => (long)(SplitMix64.Hash((ulong)seed, (ulong)step, (ulong)sequence) % (ulong)(corpus.TrainLength - context - 1));

    /// <summary>Start of validation sequence <paramref name="sequence"/>: fixed for the run, so every evaluation sees the same bytes.</summary>
    public long ValidationOffset(int sequence)
        => (long)(SplitMix64.Hash((ulong)seed ^ ValidationStream, 0, (ulong)sequence) % (ulong)(corpus.ValidationLength - context - 1));

    /// <summary>Micro-batch of sequences [first, first + count) of step <paramref name="step"/>: (inputs, targets), each [count, context] long.</summary>
    public (Tensor Inputs, Tensor Targets) TrainBatch(long step, int first, int count, Device? device = null)
        => Build(corpus.TrainToken, Enumerable.Range(first, count).Select(j => TrainOffset(step, j)), count, device);

    public (Tensor Inputs, Tensor Targets) ValidationBatch(int first, int count, Device? device = null)
        => Build(corpus.ValidationToken, Enumerable.Range(first, count).Select(ValidationOffset), count, device);

    private (Tensor, Tensor) Build(Func<long, int> source, IEnumerable<long> offsets, int count, Device? device)
    {
        var x = new long[count * context];
        var y = new long[count * context];
        int row = 0;
        foreach (var off in offsets)
        {
            for (int i = 0; i < context; i++)
            {
                x[row * context + i] = source(off + i);
                y[row * context + i] = source(off + i + 1);
            }
            row++;
        }
        var xs = tensor(x, new long[] { count, context });
        var ys = tensor(y, new long[] { count, context });
        if (device is not null && device.type != DeviceType.CPU)
        {
            var (xd, yd) = (xs.to(device), ys.to(device));
            xs.Dispose();
            ys.Dispose();
            return (xd, yd);
        }
        return (xs, ys);
    }
}

/// <summary>Pure maths of who computes what within one step.</summary>
public static class BatchAssignment
{
    /// <summary>
    /// The micro-batches data-parallel rank <paramref name="rank"/> of <paramref name="world"/> runs, as
    /// contiguous ranges so that each rank's share differs by at most one micro-batch. The union over
    /// ranks is always 0..microBatches-1, each exactly once.
    /// </summary>
    public static int[] MicroBatchesFor(int rank, int world, int microBatches)
    {
        var (start, end) = RangeFor(rank, world, microBatches);
        return Enumerable.Range(start, end - start).ToArray();
    }

    /// <summary><see cref="MicroBatchesFor"/> as the range [Start, End) (empty where the rank gets none).</summary>
    public static (int Start, int End) RangeFor(int rank, int world, int microBatches)
    {
        if (world <= 0) throw new ArgumentOutOfRangeException(nameof(world));
        if (rank < 0 || rank >= world) throw new ArgumentOutOfRangeException(nameof(rank));
        int baseCount = microBatches / world, extra = microBatches % world;
        int start = rank * baseCount + Math.Min(rank, extra);
        int count = baseCount + (rank < extra ? 1 : 0);
        return (start, start + count);
    }
}
