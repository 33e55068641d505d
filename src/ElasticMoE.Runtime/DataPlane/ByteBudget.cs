namespace ElasticMoE.Runtime.DataPlane;

/// <summary>
/// Bytes a connection's frames may hold in mailboxes. The connection's reader waits on it before reading a
/// payload; consumers give bytes back as they claim frames.
/// </summary>
internal sealed class ByteBudget(long limit)
{
    private readonly object _gate = new();
    private long _used;
    private TaskCompletionSource? _waiter;

    public long Used { get { lock (_gate) return _used; } }

    /// <remarks>
    /// Admits a request when it fits, or when nothing is held at all: otherwise a frame bigger than the
    /// budget could never be read and its connection would stall for ever.
    /// </remarks>
    public async ValueTask AcquireAsync(long bytes, CancellationToken cancellationToken)
    {
        while (true)
        {
            Task wait;
            lock (_gate)
            {
                if (_used == 0 || _used + bytes <= limit)
                {
                    _used += bytes;
                    return;
                }
                _waiter ??= new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
                wait = _waiter.Task;
            }
            await wait.WaitAsync(cancellationToken).ConfigureAwait(false);
        }
    }

    public void Release(long bytes)
    {
        TaskCompletionSource? waiter;
        lock (_gate)
        {
            _used -= bytes;
            waiter = _waiter;
            _waiter = null;
        }
        waiter?.TrySetResult();
    }
}
