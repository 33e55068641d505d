namespace ElasticMoE.Runtime.DataPlane;

/// <summary>
/// One mailbox per tag: frames that arrived before anyone asked for them, and receivers that asked before
/// their frame arrived. Either side may come first; each frame goes to exactly one receiver, in arrival order.
/// </summary>
/// <remarks>
/// <para>
/// A mailbox is removed as soon as it is empty on both sides, because collective tags are unique per
/// step and a dictionary keyed by them would otherwise grow for the whole run.
/// </para>
/// <para>
/// Every decision about who gets a frame is taken under one lock: handing it to a waiter, buffering it,
/// cancelling a waiter, dropping it for a fence. That is what makes the races safe. A frame is given only to
/// a waiter whose token is not yet cancelled, so a receive cancelled while its frame is arriving ends
/// cancelled and the frame stays queued for the next receive of its tag (or is dropped, if its tag is fenced):
/// never lost, never stranded in a task nobody will look at. A receive that got its frame before its token
/// was cancelled has completed, and the caller owns that frame like any other.
/// </para>
/// </remarks>
internal sealed class TagMailboxes
{
    private sealed class Mailbox
    {
        public readonly Queue<Pending> Frames = new();
        public readonly LinkedList<Waiter> Waiters = new();
        public bool IsEmpty => Frames.Count == 0 && Waiters.Count == 0;
    }

    private readonly record struct Pending(Frame Frame, ByteBudget? Budget, long Bytes);

    /// <summary>A receive waiting for its frame; continuations run off the lock and off the socket reader.</summary>
    /// <remarks>
    /// <see cref="Node"/> and <see cref="Registration"/> change only under the mailboxes' lock. Once a waiter
    /// is unlinked (Node null) its registration is never written again, so whoever unlinked it may read it
    /// after leaving the lock and drop it there.
    /// </remarks>
    private sealed class Waiter(Int128 tag, CancellationToken token) : TaskCompletionSource<Frame>(TaskCreationOptions.RunContinuationsAsynchronously)
    {
        public Int128 Tag { get; } = tag;
        public CancellationToken Token { get; } = token;
        public LinkedListNode<Waiter>? Node;
        public CancellationTokenRegistration Registration;

        /// <summary>
        /// Drops the token registration once the waiter is settled, so a long-lived token does not collect
        /// one callback per receive. Unregister rather than Dispose: Dispose waits for a running callback,
        /// and that callback may be waiting for a lock.
        /// </summary>
        public void Settled() => Registration.Unregister();
    }

    private sealed record Fence(long Id, Func<Int128, bool> IsStale);

    private readonly object _gate = new();
    private readonly Dictionary<Int128, Mailbox> _boxes = new();
    private readonly List<Fence> _fences = new();
    private long _nextFenceId;
    private long _bufferedBytes;
    private int _waiting;
    private long _dropped;
    private bool _closed;

    public long BufferedBytes { get { lock (_gate) return _bufferedBytes; } }

    /// <summary>Receives posted and not yet settled.</summary>
    public int WaitingCount { get { lock (_gate) return _waiting; } }

    /// <summary>Frames dropped unread: by a fence, on arrival or when it was raised, or by <see cref="Discard"/>.</summary>
    public long DroppedCount => Interlocked.Read(ref _dropped);

    /// <summary>
    /// Hands <paramref name="frame"/> to a waiting receiver or buffers it. When buffered, its bytes stay
    /// charged to <paramref name="budget"/> until claimed; otherwise they are returned at once.
    /// </summary>
    public void Deliver(Frame frame, ByteBudget? budget, long bytes)
    {
        var handedOver = false;
        var drop = false;
        Waiter? receiver = null;
        List<Waiter>? cancelled = null;
        lock (_gate)
        {
            if (_closed) drop = true;
            else if (IsFenced(frame.Tag))
            {
                drop = true;
                _dropped++;
            }
            else
            {
                if (!_boxes.TryGetValue(frame.Tag, out var box)) _boxes[frame.Tag] = box = new Mailbox();
                while (box.Waiters.First is { } first)
                {
                    box.Waiters.RemoveFirst();
                    _waiting--;
                    var waiter = first.Value;
                    waiter.Node = null;
                    if (waiter.Token.IsCancellationRequested)
                    {
                        // Its cancellation callback is on the way (or waiting for this lock): let it lose the
                        // frame rather than end "successfully" after its caller has given up.
                        (cancelled ??= []).Add(waiter);
                        continue;
                    }
                    waiter.TrySetResult(frame);
                    receiver = waiter;
                    handedOver = true;
                    break;
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
        if (drop) frame.Dispose();
        if (handedOver || drop) budget?.Release(bytes);
        receiver?.Settled();
        if (cancelled is not null) foreach (var w in cancelled) SettleCancelled(w);
    }

    public Task<Frame> ReceiveAsync(Int128 tag, CancellationToken cancellationToken)
    {
        if (cancellationToken.IsCancellationRequested) return Task.FromCanceled<Frame>(cancellationToken);
        Pending? claimed = null;
        Waiter? waiter = null;
        lock (_gate)
        {
            if (_closed) return Task.FromException<Frame>(Disposed());
            if (IsFenced(tag)) return Task.FromException<Frame>(new FencedTagException(tag));
            if (!_boxes.TryGetValue(tag, out var box)) _boxes[tag] = box = new Mailbox();
            if (box.Frames.Count > 0)
            {
                claimed = box.Frames.Dequeue();
                _bufferedBytes -= claimed.Value.Bytes;
                if (box.IsEmpty) _boxes.Remove(tag);
            }
            else
            {
                waiter = new Waiter(tag, cancellationToken);
                waiter.Node = box.Waiters.AddLast(waiter);
                _waiting++;
            }
        }
        if (claimed is { } p)
        {
            p.Budget?.Release(p.Bytes);
            return Task.FromResult(p.Frame);
        }
        if (cancellationToken.CanBeCanceled)
        {
            // Registered off the lock: a token cancelled meanwhile runs the callback right here, and it takes the lock.
            var registration = cancellationToken.Register(static state =>
            {
                var (self, w) = ((TagMailboxes, Waiter))state!;
                self.OnCancelled(w);
            }, (this, waiter!));
            bool linked;
            lock (_gate)
            {
                linked = waiter!.Node is not null;
                if (linked) waiter.Registration = registration;
            }
            // Settled already (a frame, a fence, a close or the callback itself): nobody else will drop it.
            if (!linked) registration.Unregister();
        }
        return waiter!.Task;
    }

    private void OnCancelled(Waiter waiter)
    {
        // False when it was already given a frame, failed by a fence, or closed.
        if (TryUnlink(waiter)) SettleCancelled(waiter);
    }

    // Takes a still-waiting waiter out of its mailbox; false when someone else settled it first.
    private bool TryUnlink(Waiter waiter)
    {
        lock (_gate)
        {
            if (waiter.Node?.List is not { } list) return false;
            list.Remove(waiter.Node);
            waiter.Node = null;
            _waiting--;
            if (_boxes.TryGetValue(waiter.Tag, out var box) && box.IsEmpty) _boxes.Remove(waiter.Tag);
            return true;
        }
    }

    private static void SettleCancelled(Waiter waiter)
    {
        waiter.TrySetCanceled(waiter.Token);
        waiter.Settled();
    }

    private bool IsFenced(Int128 tag)
    {
        foreach (var fence in _fences)
            if (fence.IsStale(tag)) return true;
        return false;
    }

    private static ObjectDisposedException Disposed() => new(nameof(DataPlaneNode), "The data-plane node was disposed.");

    /// <summary>
    /// Installs <paramref name="isStale"/>: buffered frames whose tag it accepts are dropped now, receives
    /// waiting for such a tag fail with <see cref="FencedTagException"/>, and later frames and receives of
    /// such tags meet the same fate until the fence is removed.
    /// </summary>
    /// <returns>The fence's id for <see cref="RemoveFence"/>, and how many buffered frames were dropped.</returns>
    public (long Id, int Dropped) AddFence(Func<Int128, bool> isStale)
    {
        ArgumentNullException.ThrowIfNull(isStale);
        var dropped = new List<Pending>();
        var failed = new List<Waiter>();
        long id;
        lock (_gate)
        {
            if (_closed) throw Disposed();
            // Evaluated before the fence goes in: a predicate that throws leaves nothing half done.
            var stale = _boxes.Where(kv => isStale(kv.Key)).ToList();
            id = ++_nextFenceId;
            _fences.Add(new Fence(id, isStale));
            foreach (var (tag, box) in stale)
            {
                while (box.Frames.TryDequeue(out var p))
                {
                    _bufferedBytes -= p.Bytes;
                    dropped.Add(p);
                }
                foreach (var w in box.Waiters) w.Node = null;
                failed.AddRange(box.Waiters);
                _waiting -= box.Waiters.Count;
                box.Waiters.Clear();
                _boxes.Remove(tag);
            }
            _dropped += dropped.Count;
        }
        Free(dropped);
        foreach (var w in failed)
        {
            w.TrySetException(new FencedTagException(w.Tag));
            w.Settled();
        }
        return (id, dropped.Count);
    }

    /// <summary>Lifts a fence; frames of its tags are delivered again from now on. False if it was already lifted.</summary>
    public bool RemoveFence(long id)
    {
        lock (_gate) return _fences.RemoveAll(f => f.Id == id) > 0;
    }

    public int FenceCount { get { lock (_gate) return _fences.Count; } }

    /// <summary>Drops buffered frames whose tag matches, returning their bytes to their connections.</summary>
    public int Discard(Func<Int128, bool> tagFilter)
    {
        ArgumentNullException.ThrowIfNull(tagFilter);
        var dropped = new List<Pending>();
        lock (_gate)
        {
            foreach (var (tag, box) in _boxes.Where(kv => tagFilter(kv.Key)).ToList())
            {
                while (box.Frames.TryDequeue(out var p))
                {
                    _bufferedBytes -= p.Bytes;
                    dropped.Add(p);
                }
                if (box.IsEmpty) _boxes.Remove(tag);
            }
            _dropped += dropped.Count;
        }
        Free(dropped);
        return dropped.Count;
    }

    private static void Free(List<Pending> frames)
    {
        foreach (var p in frames)
        {
            p.Frame.Dispose();
            p.Budget?.Release(p.Bytes);
        }
    }

    /// <summary>Fails every waiting receiver and frees every buffered frame; later calls fail.</summary>
    public void Close()
    {
        var waiters = new List<Waiter>();
        var frames = new List<Pending>();
        lock (_gate)
        {
            if (_closed) return;
            _closed = true;
            foreach (var box in _boxes.Values)
            {
                foreach (var w in box.Waiters) w.Node = null;
                waiters.AddRange(box.Waiters);
                box.Waiters.Clear();
                frames.AddRange(box.Frames);
                box.Frames.Clear();
            }
            _boxes.Clear();
            _bufferedBytes = 0;
            _waiting = 0;
            _fences.Clear();
        }
        foreach (var waiter in waiters)
        {
            waiter.TrySetException(Disposed());
            waiter.Settled();
        }
        Free(frames);
    }
}

/// <summary>
/// A receive gave up because its tag was fenced (<see cref="DataPlaneNode.Fence"/>): the step attempt it
/// belonged to was abandoned, so its frame will never be delivered.
/// </summary>
/// <remarks>
/// An <see cref="OperationCanceledException"/>, because that is what it is to the caller: its work was
/// called off, not broken; code that already treats cancellation as "this attempt is over" handles it as such.
/// </remarks>
public sealed class FencedTagException(Int128 tag)
    : OperationCanceledException($"Data-plane tag 0x{tag:X16} is fenced: its step attempt was abandoned.")
{
    public Int128 Tag { get; } = tag;
}
