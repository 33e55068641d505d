using System.Buffers;
using System.Numerics;

namespace ElasticMoE.Runtime.DataPlane;

/// <summary>
/// Payload buffers, shared by every thread.
/// </summary>
/// <remarks>
/// Why not just ArrayPool.Shared: it caches a buffer per thread first, and here one thread rents (the socket
/// reader) while another returns (the consumer). A returned 64 MB buffer then sits in the consumer thread's
/// slot where the reader never looks, so the reader allocates a fresh one, whose first touch costs tens of
/// milliseconds of page faults: measured, it halved large-frame throughput. These buckets are global.
/// Small buffers still go to ArrayPool.Shared, where a miss is cheap.
/// </remarks>
internal static class BufferPool
{
    private const int MinPooledShift = 16;               // 64 KiB
    private const int MaxPooledShift = 30;               // 1 GiB
    private const long RetainBytesPerBucket = 512L << 20; // cap on idle memory held by one bucket

    private static readonly Bucket[] Buckets = Enumerable.Range(MinPooledShift, MaxPooledShift - MinPooledShift + 1)
        .Select(shift => new Bucket(1 << shift, (int)Math.Clamp(RetainBytesPerBucket >> shift, 2, 32)))
        .ToArray();

    public static byte[] Rent(int minimumLength)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(minimumLength);
        if (minimumLength < 1 << MinPooledShift) return ArrayPool<byte>.Shared.Rent(minimumLength);
        var shift = BitOperations.Log2(BitOperations.RoundUpToPowerOf2((uint)minimumLength));
        if (shift > MaxPooledShift) return GC.AllocateUninitializedArray<byte>(minimumLength);
        return Buckets[shift - MinPooledShift].Rent();
    }

    public static void Return(byte[] buffer)
    {
        if (buffer.Length < 1 << MinPooledShift)
        {
            ArrayPool<byte>.Shared.Return(buffer);
            return;
        }
        if (!BitOperations.IsPow2(buffer.Length)) return; // not one of ours (or oversize): let the GC have it
        var shift = BitOperations.Log2((uint)buffer.Length);
        if (shift <= MaxPooledShift) Buckets[shift - MinPooledShift].Return(buffer);
    }

    private sealed class Bucket(int length, int capacity)
    {
        private readonly Stack<byte[]> _free = new();

        public byte[] Rent()
        {
            lock (_free)
            {
                if (_free.TryPop(out var buffer)) return buffer;
            }
            // Uninitialised: every byte is about to be overwritten by the socket or a copy.
            return GC.AllocateUninitializedArray<byte>(length);
        }

        public void Return(byte[] buffer)
        {
            lock (_free)
            {
                if (_free.Count < capacity) _free.Push(buffer);
            }
        }
    }
}
