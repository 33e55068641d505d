using System.Collections.Concurrent;

namespace ElasticMoE.Runtime.Hosting;

/// <summary>
/// Runs compute handed to it on the thread that calls <see cref="RunUntil"/> — in practice the
/// process's main thread, which otherwise only waits for the run to end.
/// </summary>
/// <remarks>
/// Why: measured on this project's 2-core machines, the same libtorch training step runs 10–15 % slower
/// on any thread other than the process's main one (OpenMP team and allocator behaviour), which is
/// exactly the overhead an actor runtime must not add on one node. So the stage of the first worker
/// hands its torch work here and waits; its actor still owns the protocol, ordering and failures.
/// </remarks>
public sealed class ComputeLoop
{
    private readonly BlockingCollection<Action> _work = new();
    private int _loopThread = -1;

    /// <summary>Runs <paramref name="work"/> on the loop thread and returns its result (or rethrows its exception).</summary>
    public T Invoke<T>(Func<T> work)
    {
        if (Environment.CurrentManagedThreadId == _loopThread) return work();
        var done = new TaskCompletionSource<T>(TaskCreationOptions.RunContinuationsAsynchronously);
        _work.Add(() =>
        {
            try { done.SetResult(work()); }
            catch (Exception ex) { done.SetException(ex); }
        });
        return done.Task.GetAwaiter().GetResult();
    }

    /// <summary>Serves work on the calling thread until <paramref name="until"/> completes.</summary>
    public void RunUntil(Task until)
    {
        _loopThread = Environment.CurrentManagedThreadId;
        try
        {
            while (!until.IsCompleted)
                if (_work.TryTake(out var item, 20)) item();
            // Whatever was queued as the run ended still gets an answer.
            while (_work.TryTake(out var item)) item();
        }
        finally
        {
            _loopThread = -1;
        }
    }
}
