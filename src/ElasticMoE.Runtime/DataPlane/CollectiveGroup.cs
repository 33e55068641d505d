using System.Numerics;
using System.Runtime.CompilerServices;
using System.Runtime.ExceptionServices;
using System.Runtime.InteropServices;
using ElasticMoE.Training;

namespace ElasticMoE.Runtime.DataPlane;

public sealed record CollectiveOptions
{
    /// <summary>
    /// Largest piece of a ring segment sent as one frame. Smaller pieces pipeline better (a rank forwards
    /// piece 0 while piece 1 is still arriving) at a cost per frame. Must be the same on every member:
    /// it decides the tags.
    /// </summary>
    public int ChunkBytes { get; init; } = 4 << 20;
}

/// <summary>
/// Collectives over the data plane among an ordered list of members, one of which is this node.
/// </summary>
/// <remarks>
/// Every member must call the same collective with the same collective id (see <see cref="CollectiveTags"/>)
/// and, for all-reduce, the same buffer length. A group holds no state between calls, so a new membership is
/// just a new group.
/// </remarks>
public sealed class CollectiveGroup
{
    private readonly CollectiveOptions _options;

    public CollectiveGroup(DataPlaneNode node, IReadOnlyList<string> members, int rank, CollectiveOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(node);
        ArgumentNullException.ThrowIfNull(members);
        if (members.Count == 0) throw new ArgumentException("A group needs at least one member.", nameof(members));
        if ((uint)rank >= (uint)members.Count) throw new ArgumentOutOfRangeException(nameof(rank), rank, $"Rank must be in 0..{members.Count - 1}.");
        if (members.Distinct(StringComparer.OrdinalIgnoreCase).Count() != members.Count)
            throw new ArgumentException("Group members must be distinct endpoints.", nameof(members));
        _options = options ?? new CollectiveOptions();
        if (_options.ChunkBytes < sizeof(float)) throw new ArgumentOutOfRangeException(nameof(options), "ChunkBytes must hold at least one float.");
        Node = node;
        Members = members.ToArray();
        Rank = rank;
    }

    public DataPlaneNode Node { get; }
    public IReadOnlyList<string> Members { get; }
    public int Rank { get; }
    public int Size => Members.Count;

    /// <summary>
    /// Sums <paramref name="buffer"/> across the group, in place; afterwards every member holds bit-identical values.
    /// </summary>
    /// <remarks>
    /// <para>
    /// Ring algorithm: the buffer is cut into <see cref="Size"/> segments; n-1 reduce-scatter steps leave
    /// rank r with the complete sum of segment r+1, and n-1 all-gather steps pass each complete segment
    /// around. Each rank sends and receives 2(n-1)/n of the buffer, whatever n is.
    /// </para>
    /// <para>
    /// Why every rank ends bit-identical: each segment's final sum is computed by exactly one rank, always in
    /// ring order, and the others receive a copy of those bits; no rank re-adds in another order. With
    /// bfloat16 compression the owner also rounds its own copy to bfloat16 before passing it on, so it holds
    /// exactly what everyone else decodes. (Partial sums travel rounded too, so the result differs from an
    /// uncompressed sum by about bf16 precision, but it is the same on every rank and on every run.)
    /// </para>
    /// <para>
    /// Segments are further cut into <see cref="CollectiveOptions.ChunkBytes"/> pieces that go round the ring
    /// independently, so sends, receives and additions overlap instead of alternating.
    /// </para>
    /// </remarks>
    public async Task AllReduceSumAsync(Memory<float> buffer, long collectiveId, Compression compression = Compression.None,
        CancellationToken cancellationToken = default)
    {
        var n = Size;
        if (n == 1 || buffer.IsEmpty) return;
        if (compression is not (Compression.None or Compression.BFloat16)) throw new ArgumentOutOfRangeException(nameof(compression));
        var chunkElements = Math.Max(1, _options.ChunkBytes / sizeof(float));
        var maxSegment = (buffer.Length + n - 1) / n;
        var pieces = Math.Max(1, (maxSegment + chunkElements - 1) / chunkElements);
        if ((long)2 * (n - 1) * pieces > CollectiveTags.MaxSubTag + 1L)
            throw new ArgumentException($"Buffer of {buffer.Length} floats needs more than {CollectiveTags.MaxSubTag + 1L} frames; raise ChunkBytes.");

        var ring = new Ring(this, buffer, collectiveId, compression, chunkElements, pieces);
        await RunPiecesAsync(pieces, ring.RunPieceAsync, cancellationToken).ConfigureAwait(false);
    }

    // Runs the pieces side by side; a failing piece stops the others instead of leaving them waiting for frames
    // that will not come, and the first real failure surfaces rather than a cancellation it caused in a sibling.
    private static async Task RunPiecesAsync(int pieces, Func<int, CancellationToken, Task> run, CancellationToken cancellationToken)
    {
        using var failed = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        var tasks = new Task[pieces];
        for (var c = 0; c < pieces; c++)
        {
            var piece = c;
            tasks[c] = Task.Run(async () =>
            {
                try { await run(piece, failed.Token).ConfigureAwait(false); }
                catch { failed.Cancel(); throw; }
            }, CancellationToken.None);
        }
        try
        {
            await Task.WhenAll(tasks).ConfigureAwait(false);
        }
        catch when (!cancellationToken.IsCancellationRequested)
        {
            var first = tasks.Where(t => t.IsFaulted).Select(t => t.Exception!.InnerException!).FirstOrDefault();
            if (first is not null) ExceptionDispatchInfo.Throw(first);
            throw;
        }
    }

    private sealed class Ring(CollectiveGroup group, Memory<float> buffer, long collectiveId, Compression compression, int chunkElements, int pieces)
    {
        private readonly int _n = group.Size;
        private readonly int _rank = group.Rank;
        private readonly string _right = group.Members[(group.Rank + 1) % group.Size];

        public async Task RunPieceAsync(int piece, CancellationToken cancellationToken)
        {
            for (var s = 0; s < _n - 1; s++)
                await ExchangeAsync(Mod(_rank - s), Mod(_rank - s - 1), piece, s, reduce: true, cancellationToken).ConfigureAwait(false);

            if (compression == Compression.BFloat16)
            {
                var (start, length) = Piece(Mod(_rank + 1), piece);
                BFloat16.RoundInPlace(buffer.Span.Slice(start, length));
            }

            for (var s = 0; s < _n - 1; s++)
                await ExchangeAsync(Mod(_rank + 1 - s), Mod(_rank - s), piece, _n - 1 + s, reduce: false, cancellationToken).ConfigureAwait(false);
        }

        private async Task ExchangeAsync(int sendSegment, int receiveSegment, int piece, int step, bool reduce, CancellationToken cancellationToken)
        {
            // Sender and receiver derive the same tag: what rank r sends at step s is what r+1 expects at step s.
            var tag = CollectiveTags.Compose(collectiveId, step * pieces + piece);
            var (sendStart, sendLength) = Piece(sendSegment, piece);
            var (receiveStart, receiveLength) = Piece(receiveSegment, piece);
            // Posted before sending, so a neighbour that is quicker never waits on a mailbox nobody claims.
            var receive = receiveLength > 0 ? group.Node.ReceiveAsync(tag, cancellationToken) : null;
            try
            {
                if (sendLength > 0)
                    await group.Node.SendAsync(_right, tag, buffer.Slice(sendStart, sendLength), null, compression, cancellationToken).ConfigureAwait(false);
            }
            catch
            {
                // The caller cancels the token on failure, which removes the receive; if its frame beat the
                // cancellation, the frame is ours to free.
                if (receive is not null) DisposeWhenDone(receive);
                throw;
            }
            if (receive is null) return;
            using var frame = await receive.ConfigureAwait(false);
            if (frame.ElementType != ElementType.Float32 || frame.ElementCount != receiveLength)
                throw new InvalidOperationException(
                    $"All-reduce {collectiveId}: expected {receiveLength} floats at step {step}, got {frame}. " +
                    "Members disagree on the buffer length or ChunkBytes.");
            var target = buffer.Span.Slice(receiveStart, receiveLength);
            if (reduce) AddInPlace(target, frame.AsFloats());
            else frame.AsFloats().CopyTo(target);
        }

        // Segment i is [L*i/n, L*(i+1)/n); piece c of it is the c-th run of chunkElements within it (maybe empty).
        private (int Start, int Length) Piece(int segment, int piece)
        {
            var length = buffer.Length;
            var segmentStart = (int)((long)length * segment / _n);
            var segmentEnd = (int)((long)length * (segment + 1) / _n);
            var start = segmentStart + (long)piece * chunkElements;
            if (start >= segmentEnd) return (segmentEnd, 0);
            return ((int)start, (int)Math.Min(chunkElements, segmentEnd - start));
        }

        private int Mod(int i) => ((i % _n) + _n) % _n;
    }

    /// <summary>
    /// The canonical sum (<see cref="ReductionTree"/>) of the group's partial sums, written to <paramref name="result"/>;
    /// afterwards every member holds the same bits, and they are the bits the single-process loop computes.
    /// </summary>
    /// <param name="result">Where the sum goes; every member gives the same length.</param>
    /// <param name="partials">This member's partials: the nodes of <see cref="ReductionTree.Cover"/> over its range, each
    /// of <paramref name="result"/>'s length (their memory is used as scratch).</param>
    /// <param name="ranges">Every member's micro-batches [Lo, Hi), by rank: each member derives from them what the others send.</param>
    /// <param name="leaves">Micro-batches in the step.</param>
    /// <remarks>
    /// <para>
    /// Reduce-scatter then all-gather, as the ring, but the reduction is not ring order: segment s (of n) belongs to
    /// rank s, every rank sends it its partials' slices of that segment in one frame per piece, and rank s combines
    /// them up the tree (node = left + right). Then rank s sends its finished segment to every other rank. Bytes a rank
    /// sends: (n−1)/n of the buffer times its number of partials, plus (n−1)/n for the gather — the ring's 2(n−1)/n when
    /// each share is one aligned node (e.g. 8 micro-batches on 2 or 4 ranks), more for shares that are not (12 on 2
    /// ranks: 2 partials each, so 3(n−1)/n). Every frame is direct, so a step is two rounds of latency, not 2(n−1).
    /// </para>
    /// <para>No bfloat16 option: a compressed partial would round differently with every layout.</para>
    /// </remarks>
    public async Task TreeAllReduceAsync(Memory<float> result, IReadOnlyList<(TreeNode Node, Memory<float> Value)> partials,
        IReadOnlyList<(int Lo, int Hi)> ranges, int leaves, long collectiveId, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(partials);
        ArgumentNullException.ThrowIfNull(ranges);
        if (ranges.Count != Size) throw new ArgumentException($"Need one range per member ({Size}), got {ranges.Count}.", nameof(ranges));
        var covers = ranges.Select(r => ReductionTree.Cover(r.Lo, r.Hi, leaves)).ToArray();
        if (!covers[Rank].SequenceEqual(partials.Select(p => p.Node)))
            throw new ArgumentException($"Partials [{string.Join(", ", partials.Select(p => p.Node))}] are not the cover of this member's range [{string.Join(", ", covers[Rank])}].", nameof(partials));
        foreach (var (node, value) in partials)
            if (value.Length != result.Length) throw new ArgumentException($"Partial {node} has {value.Length} floats, the result {result.Length}.", nameof(partials));
        if (result.IsEmpty) return;
        var n = Size;
        var maxParts = Math.Max(1, covers.Max(c => c.Count));
        // A frame carries every partial's slice of one piece, so pieces shrink with the number of partials.
        var chunkElements = Math.Max(1, _options.ChunkBytes / sizeof(float) / maxParts);
        var maxSegment = (result.Length + n - 1) / n;
        var pieces = Math.Max(1, (maxSegment + chunkElements - 1) / chunkElements);
        if ((long)2 * pieces * n > CollectiveTags.MaxSubTag + 1L)
            throw new ArgumentException($"Buffer of {result.Length} floats needs more than {CollectiveTags.MaxSubTag + 1L} frames; raise ChunkBytes.");

        await RunPiecesAsync(pieces, (piece, token) => TreePieceAsync(result, partials, covers, leaves, collectiveId, chunkElements, pieces, piece, token),
            cancellationToken).ConfigureAwait(false);
    }

    private sealed class Buffer(Memory<float> memory)
    {
        public Memory<float> Memory { get; } = memory;
    }

    private async Task TreePieceAsync(Memory<float> result, IReadOnlyList<(TreeNode Node, Memory<float> Value)> partials,
        List<TreeNode>[] covers, int leaves, long collectiveId, int chunkElements, int pieces, int piece, CancellationToken cancellationToken)
    {
        var n = Size;
        (int Start, int Length) Piece(int segment)
        {
            var segmentStart = (int)((long)result.Length * segment / n);
            var segmentEnd = (int)((long)result.Length * (segment + 1) / n);
            var start = segmentStart + (long)piece * chunkElements;
            return start >= segmentEnd ? (segmentEnd, 0) : ((int)start, (int)Math.Min(chunkElements, segmentEnd - start));
        }
        Int128 ReduceTag(int src) => CollectiveTags.Compose(collectiveId, piece * n + src);
        Int128 GatherTag(int owner) => CollectiveTags.Compose(collectiveId, pieces * n + piece * n + owner);

        var (myStart, myLength) = Piece(Rank);
        var reduces = new Task<Frame>?[n];
        var gathers = new Task<Frame>?[n];
        var frames = new List<Frame>();
        try
        {
            // Receives first, so a quicker peer never waits on a mailbox nobody claims.
            for (var r = 0; r < n; r++)
            {
                if (r == Rank) continue;
                if (myLength > 0 && covers[r].Count > 0) reduces[r] = Node.ReceiveAsync(ReduceTag(r), cancellationToken);
                if (Piece(r).Length > 0) gathers[r] = Node.ReceiveAsync(GatherTag(r), cancellationToken);
            }
            var sends = new List<Task>();
            for (var owner = 0; owner < n; owner++)
            {
                var (start, length) = Piece(owner);
                if (owner == Rank || length == 0 || partials.Count == 0) continue;
                var payload = new float[length * partials.Count];
                for (var k = 0; k < partials.Count; k++) partials[k].Value.Span.Slice(start, length).CopyTo(payload.AsSpan(k * length));
                sends.Add(Node.SendAsync(Members[owner], ReduceTag(Rank), payload, null, Compression.None, cancellationToken));
            }

            if (myLength > 0)
            {
                var nodes = new Dictionary<TreeNode, Buffer?>();
                for (var k = 0; k < partials.Count; k++) nodes[partials[k].Node] = new Buffer(partials[k].Value.Slice(myStart, myLength));
                for (var r = 0; r < n; r++)
                {
                    if (reduces[r] is not { } receive) continue;
                    var frame = await receive.ConfigureAwait(false);
                    reduces[r] = null;
                    frames.Add(frame);
                    if (frame.ElementType != ElementType.Float32 || frame.ElementCount != (long)myLength * covers[r].Count)
                        throw new InvalidOperationException($"Tree all-reduce {collectiveId}: expected {covers[r].Count} x {myLength} floats from rank {r}, got {frame}. Members disagree on the ranges or the buffer.");
                    var values = new float[myLength * covers[r].Count];
                    frame.AsFloats().CopyTo(values);
                    for (var k = 0; k < covers[r].Count; k++) nodes[covers[r][k]] = new Buffer(values.AsMemory(k * myLength, myLength));
                }
                var root = ReductionTree.CombineRoot(leaves, nodes, static (l, r) =>
                {
                    AddInPlace(l!.Memory.Span, r!.Memory.Span);
                    return l;
                });
                var mine = result.Slice(myStart, myLength);
                if (root is null) mine.Span.Clear();
                else root.Memory.CopyTo(mine);
                for (var r = 0; r < n; r++)
                    if (r != Rank) sends.Add(Node.SendAsync(Members[r], GatherTag(Rank), mine, null, Compression.None, cancellationToken));
            }
            await Task.WhenAll(sends).ConfigureAwait(false);
            for (var owner = 0; owner < n; owner++)
            {
                if (gathers[owner] is not { } receive) continue;
                var (start, length) = Piece(owner);
                using var frame = await receive.ConfigureAwait(false);
                gathers[owner] = null;
                if (frame.ElementType != ElementType.Float32 || frame.ElementCount != length)
                    throw new InvalidOperationException($"Tree all-reduce {collectiveId}: expected {length} floats of segment {owner}, got {frame}.");
                frame.AsFloats().CopyTo(result.Span.Slice(start, length));
            }
        }
        catch
        {
            // Receives not consumed: their frames are freed whenever they arrive (at once if they have).
            foreach (var t in reduces.Concat(gathers))
                if (t is not null) DisposeWhenDone(t);
            throw;
        }
        finally
        {
            foreach (var f in frames) f.Dispose();
        }
    }

    internal static void AddInPlace(Span<float> target, ReadOnlySpan<float> source)
    {
        if (source.Length != target.Length) throw new ArgumentException("Length mismatch.");
        ref var t = ref MemoryMarshal.GetReference(target);
        ref var s = ref MemoryMarshal.GetReference(source);
        var i = 0;
        var n = target.Length;
        if (Vector.IsHardwareAccelerated)
        {
            for (; i <= n - Vector<float>.Count; i += Vector<float>.Count)
                (Vector.LoadUnsafe(ref t, (nuint)i) + Vector.LoadUnsafe(ref s, (nuint)i)).StoreUnsafe(ref t, (nuint)i);
        }
        for (; i < n; i++) Unsafe.Add(ref t, i) += Unsafe.Add(ref s, i);
    }

    /// <summary>
    /// Every member sends <paramref name="payloads"/>[j] to member j (empty is fine) and gets back, in rank
    /// order, one frame from every member; its own entry is a local copy. The caller disposes the frames.
    /// </summary>
    public Task<Frame[]> AllToAllAsync(IReadOnlyList<ReadOnlyMemory<byte>> payloads, long collectiveId, ElementType elementType = ElementType.UInt8,
        CancellationToken cancellationToken = default)
    {
        CheckPerRank(payloads);
        var size = ElementTypes.SizeOf(elementType);
        if (size == 0) throw new ArgumentException($"Unknown element type {elementType}.", nameof(elementType));
        return AllToAllCoreAsync(collectiveId,
            self => Frame.Copy(self, Node.NodeId, elementType, [payloads[Rank].Length / size], payloads[Rank].Span),
            (dst, tag, ct) => Node.SendAsync(Members[dst], tag, payloads[dst], elementType, null, ct),
            cancellationToken);
    }

    /// <summary>All-to-all of float32 payloads, optionally bfloat16 on the wire (own entry rounded the same way).</summary>
    public Task<Frame[]> AllToAllAsync(IReadOnlyList<ReadOnlyMemory<float>> payloads, long collectiveId, Compression compression = Compression.None,
        CancellationToken cancellationToken = default)
    {
        CheckPerRank(payloads);
        return AllToAllCoreAsync(collectiveId,
            self =>
            {
                var own = payloads[Rank].Span;
                var frame = Frame.Copy(self, Node.NodeId, ElementType.Float32, [own.Length], MemoryMarshal.AsBytes(own));
                if (compression == Compression.BFloat16)
                    BFloat16.RoundInPlace(MemoryMarshal.Cast<byte, float>(frame.MutableSpan));
                return frame;
            },
            (dst, tag, ct) => Node.SendAsync(Members[dst], tag, payloads[dst], null, compression, ct),
            cancellationToken);
    }

    private void CheckPerRank<T>(IReadOnlyList<T> payloads)
    {
        ArgumentNullException.ThrowIfNull(payloads);
        if (payloads.Count != Size) throw new ArgumentException($"Need one payload per member ({Size}), got {payloads.Count}.", nameof(payloads));
    }

    private async Task<Frame[]> AllToAllCoreAsync(long collectiveId, Func<Int128, Frame> self, Func<int, Int128, CancellationToken, Task> send,
        CancellationToken cancellationToken)
    {
        var results = new Frame[Size];
        var receives = new Task<Frame>?[Size];
        // Cancelled on failure, so receives that will never be awaited stop waiting instead of lingering as
        // mailbox waiters that would swallow (and strand) their frames if they came after all.
        using var abandon = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        try
        {
            // Each frame's sub-tag is its sender's rank, so one mailbox per sender and none shared.
            for (var src = 0; src < Size; src++)
                if (src != Rank) receives[src] = Node.ReceiveAsync(CollectiveTags.Compose(collectiveId, src), abandon.Token);
            results[Rank] = self(CollectiveTags.Compose(collectiveId, Rank));
            var sends = new List<Task>(Size);
            for (var dst = 0; dst < Size; dst++)
                if (dst != Rank) sends.Add(send(dst, CollectiveTags.Compose(collectiveId, Rank), abandon.Token));
            await Task.WhenAll(sends).ConfigureAwait(false);
            for (var src = 0; src < Size; src++)
                if (receives[src] is { } receive) results[src] = await receive.ConfigureAwait(false);
            return results;
        }
        catch
        {
            abandon.Cancel();
            foreach (var frame in results) frame?.Dispose();
            // Frames already in hand, or handed over just before the cancellation, are freed when they settle.
            for (var src = 0; src < Size; src++)
                if (receives[src] is { } receive && results[src] is null) DisposeWhenDone(receive);
            throw;
        }
    }

    /// <summary>
    /// Frees the frame of a receive that nobody will await, whenever it completes; observes its failure otherwise.
    /// </summary>
    private static void DisposeWhenDone(Task<Frame> receive) =>
        receive.ContinueWith(static t =>
        {
            if (t.IsCompletedSuccessfully) t.Result.Dispose();
            else _ = t.Exception; // observed: an abandoned receive's failure is expected, not news
        }, CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);

    /// <summary>Point-to-point: sends to member <paramref name="destinationRank"/>, which receives it with <see cref="ReceiveAsync"/>.</summary>
    public Task SendAsync(int destinationRank, long collectiveId, ReadOnlyMemory<byte> payload, ElementType elementType = ElementType.UInt8,
        long[]? shape = null, CancellationToken cancellationToken = default) =>
        Node.SendAsync(Member(destinationRank), CollectiveTags.Compose(collectiveId, Rank), payload, elementType, shape, cancellationToken);

    public Task SendAsync(int destinationRank, long collectiveId, ReadOnlyMemory<float> values, long[]? shape = null,
        Compression compression = Compression.None, CancellationToken cancellationToken = default) =>
        Node.SendAsync(Member(destinationRank), CollectiveTags.Compose(collectiveId, Rank), values, shape, compression, cancellationToken);

    /// <summary>The next frame member <paramref name="sourceRank"/> sent this member under <paramref name="collectiveId"/>.</summary>
    public Task<Frame> ReceiveAsync(int sourceRank, long collectiveId, CancellationToken cancellationToken = default)
    {
        Member(sourceRank);
        return Node.ReceiveAsync(CollectiveTags.Compose(collectiveId, sourceRank), cancellationToken);
    }

    /// <summary>Drops frames of a collective that was given up, so they stop holding memory and buffering budget.</summary>
    /// <remarks>Only those buffered now; to catch frames still on the wire too, use <see cref="DataPlaneNode.Fence"/>.</remarks>
    public int Abandon(long collectiveId) => Node.DiscardBuffered(tag => CollectiveTags.BelongsTo(tag, collectiveId));

    private string Member(int rank) =>
        (uint)rank < (uint)Size ? Members[rank] : throw new ArgumentOutOfRangeException(nameof(rank), rank, $"Rank must be in 0..{Size - 1}.");
}
