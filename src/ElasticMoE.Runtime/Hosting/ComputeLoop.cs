using System.Collections.Concurrent;

namespace ElasticMoE.Runtime.Hosting;

/// <summary>
/// Runs work handed to it on the thread that calls <see cref="RunUntil"/> — in practice the process's
/// main thread, which otherwise only waits for the run to end. Actors run on it through
/// <see cref="ComputeLoopDispatcher"/>; other threads can also <see cref="Invoke{T}"/> work on it.
/// </summary>
/// <remarks>
/// Why: measured on this project's 2-core machines, the same libtorch training step runs slower on any
/// thread other than the process's main one (OpenMP team and allocator behaviour), which is exactly the
/// overhead an actor runtime must not add on one node. And each hop between threads costs a wake-up
/// (0.3–0.5 ms on a busy 2-core box), so the actors of a worker's torch work run on this thread itself
/// rather than handing their work over to it.
/// </remarks>
public sealed class ComputeLoop
{
    private readonly BlockingCollection<Action> _work = new();
    private int _loopThread = -1;
    // Once the loop has stopped serving, posted work runs on the thread pool: an actor on this loop
    // must still be able to stop while its ActorSystem shuts down.
    private volatile bool _closed;

    /// <summary>True on the thread that serves the loop, while it serves it.</summary>
    public bool OnLoopThread => Environment.CurrentManagedThreadId == _loopThread;

    /// <summary>Runs <paramref name="work"/> on the loop thread and returns its result (or rethrows its exception).</summary>
    public T Invoke<T>(Func<T> work)
    {
        if (OnLoopThread) return work();
        var done = new TaskCompletionSource<T>(TaskCreationOptions.RunContinuationsAsynchronously);
        Post(() =>
        {
            try { done.SetResult(work()); }
            catch (Exception ex) { done.SetException(ex); }
        });
        return done.Task.GetAwaiter().GetResult();
    }

    /// <summary>Queues <paramref name="work"/> for the loop thread (the thread pool once the loop has ended).</summary>
    public void Post(Action work)
    {
        if (!_closed)
        {
            try
            {
                _work.Add(work);
                return;
            }
            catch (InvalidOperationException) { /* completed for adding: the loop has ended */ }
        }
        ThreadPool.UnsafeQueueUserWorkItem(static w => w(), work, preferLocal: false);
    }

    /// <summary>Serves work on the calling thread until <paramref name="until"/> completes.</summary>
    /// <remarks>
    /// Sleeps until there is work: <paramref name="until"/>'s completion posts a no-op that wakes it,
    /// instead of a 20 ms poll that kept an idle (or orphaned) loop thread busy 50 times a second.
    /// </remarks>
    public void RunUntil(Task until)
    {
        _loopThread = Environment.CurrentManagedThreadId;
        until.ContinueWith(static (_, loop) => ((ComputeLoop)loop!).Post(static () => { }), this,
            CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
        try
        {
            while (!until.IsCompleted)
                if (_work.TryTake(out var item, Timeout.Infinite)) item();
        }
        finally
        {
            _loopThread = -1;
            _closed = true;
            _work.CompleteAdding();
            // Whatever was queued as the run ended still runs, on the thread pool.
            while (_work.TryTake(out var item)) Post(item);
        }
    }
}
