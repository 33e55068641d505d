namespace ElasticMoE.Runtime.DataPlane;

/// <summary>
/// One mailbox per tag: frames that arrived before anyone asked for them, and receivers that asked before
/// their frame arrived. Either side may come first; each frame goes to exactly one receiver, in arrival order.
/// </summary>
/// <remarks>
/// A mailbox is removed as soon as it is empty on both sides, because collective tags are unique per
/// step and a dictionary keyed by them would otherwise grow for the whole run.
/// </remarks>
internal sealed class TagMailboxes
{
    private sealed class Mailbox
    {
        public readonly Queue<Pending> Frames = new();
        public readonly LinkedList<TaskCompletionSource<Frame>> Waiters = new();
        public bool IsEmpty => Frames.Count == 0 && Waiters.Count == 0;
    }

    private readonly record struct Pending(Frame Frame, ByteBudget? Budget, long Bytes);

    private readonly object _gate = new();
    private readonly Dictionary<long, Mailbox> _boxes = new();
    private long _bufferedBytes;
    private bool _closed;

    public long BufferedBytes { get { lock (_gate) return _bufferedBytes; } }

    /// <summary>
    /// Hands <paramref name="frame"/> to a waiting receiver or buffers it. When buffered, its bytes stay
    /// charged to <paramref name="budget"/> until claimed; otherwise they are returned at once.
    /// </summary>
    public void Deliver(Frame frame, ByteBudget? budget, long bytes)
    {
        var handedOver = false;
        lock (_gate)
        {
            if (_closed)
            {
                frame.Dispose();
                handedOver = true;
            }
            else
            {
                if (!_boxes.TryGetValue(frame.Tag, out var box)) _boxes[frame.Tag] = box = new Mailbox();
                while (box.Waiters.First is { } first)
                {
                    box.Waiters.RemoveFirst();
                    if (first.Value.TrySetResult(frame)) { handedOver = true; break; }
                }
                if (handedOver)
                {
                    if (box.IsEmpty) _boxes.Remove(frame.Tag);
                }
                else
                {
                    box.Frames.Enqueue(new Pending(frame, budget, bytes));
                    _bufferedBytes += bytes;
                }
            }
        }
        if (handedOver) budget?.Release(bytes);
    }

    public Task<Frame> ReceiveAsync(long tag, CancellationToken cancellationToken)
    {
        if (cancellationToken.IsCancellationRequested) return Task.FromCanceled<Frame>(cancellationToken);
        Pending? claimed = null;
        TaskCompletionSource<Frame>? tcs = null;
        LinkedListNode<TaskCompletionSource<Frame>>? node = null;
        lock (_gate)
        {
            if (_closed) return Task.FromException<Frame>(Disposed());
            if (!_boxes.TryGetValue(tag, out var box)) _boxes[tag] = box = new Mailbox();
            if (box.Frames.Count > 0)
            {
                claimed = box.Frames.Dequeue();
                _bufferedBytes -= claimed.Value.Bytes;
                if (box.IsEmpty) _boxes.Remove(tag);
            }
            else
            {
                // Continuations run off this lock and off the socket reader that completes them.
                tcs = new TaskCompletionSource<Frame>(TaskCreationOptions.RunContinuationsAsynchronously);
                node = box.Waiters.AddLast(tcs);
            }
        }
        if (claimed is { } p)
        {
            p.Budget?.Release(p.Bytes);
            return Task.FromResult(p.Frame);
        }
        if (cancellationToken.CanBeCanceled)
        {
            var registration = cancellationToken.Register(() =>
            {
                lock (_gate)
                {
                    if (node!.List is { } list)
                    {
                        list.Remove(node);
                        if (_boxes.TryGetValue(tag, out var box) && box.IsEmpty) _boxes.Remove(tag);
                    }
                }
                tcs!.TrySetCanceled(cancellationToken);
            });
            _ = tcs!.Task.ContinueWith(static (_, r) => ((CancellationTokenRegistration)r!).Dispose(), registration,
                CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
        }
        return tcs!.Task;
    }

    private static ObjectDisposedException Disposed() => new(nameof(DataPlaneNode), "The data-plane node was disposed.");

    /// <summary>Drops buffered frames whose tag matches, returning their bytes to their connections.</summary>
    public int Discard(Func<long, bool> tagFilter)
    {
        var dropped = new List<Pending>();
        lock (_gate)
        {
            foreach (var (tag, box) in _boxes.Where(kv => tagFilter(kv.Key)).ToList())
            {
                while (box.Frames.Count > 0)
                {
                    var p = box.Frames.Dequeue();
                    _bufferedBytes -= p.Bytes;
                    dropped.Add(p);
                }
                if (box.IsEmpty) _boxes.Remove(tag);
            }
        }
        foreach (var p in dropped)
        {
            p.Frame.Dispose();
            p.Budget?.Release(p.Bytes);
        }
        return dropped.Count;
    }

    /// <summary>Fails every waiting receiver and frees every buffered frame; later calls fail.</summary>
    public void Close()
    {
        var waiters = new List<TaskCompletionSource<Frame>>();
        var frames = new List<Frame>();
        lock (_gate)
        {
            if (_closed) return;
            _closed = true;
            foreach (var box in _boxes.Values)
            {
                waiters.AddRange(box.Waiters);
                box.Waiters.Clear();
                frames.AddRange(box.Frames.Select(p => p.Frame));
                box.Frames.Clear();
            }
            _boxes.Clear();
            _bufferedBytes = 0;
        }
        foreach (var waiter in waiters) waiter.TrySetException(Disposed());
        foreach (var frame in frames) frame.Dispose();
    }
}
