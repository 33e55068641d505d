using System.Runtime.InteropServices;
using ElasticMoE.Runtime.Hosting;

namespace ElasticMoE.Cli;

/// <summary>
/// SIGTERM and SIGINT for a command that must stop cleanly. The first signal's default action is
/// cancelled and turns into a stop request (<see cref="First"/>, <see cref="Token"/>) that the command
/// acts on: finish the step, write the metrics, stop the nodes, exit with 128 + the signal number. A
/// second signal exits at once with that code, and so does the first one if the process is still
/// alive <see cref="HardDeadline"/> after it (a step that cannot be interrupted, a peer that does not answer).
/// </summary>
/// <remarks>
/// Why PosixSignalRegistration and not Console.CancelKeyPress: CancelKeyPress only sees SIGINT (and
/// SIGQUIT). Since .NET 10 the runtime has no SIGTERM handler of its own, so SIGTERM would kill the
/// process mid-step; and before this class, Akka's CoordinatedShutdown registered one that terminated
/// the ActorSystems under the run and left the main thread waiting forever (the process of
/// `timeout 600 elasticmoe train` was still alive 9 minutes later). ClusterNode now turns Akka's hook
/// off (run-by-clr-shutdown-hook), so these registrations are the only ones, and a signal we do not
/// cancel takes its default action.
/// </remarks>
public sealed class StopSignals : IDisposable
{
    /// <summary>
    /// From the first signal to a forced exit. The promise to callers is 5 s; forced, a 60 M-parameter
    /// model mid-step exited 4.35 s after the signal on the 2-core box. The graceful path takes
    /// 0.1 s (--single-process), 0.8 s (node), 1.2-1.6 s (train with a cluster) here, so this fires only
    /// when a step cannot finish in time or something hangs.
    /// </summary>
    public static readonly TimeSpan HardDeadline = TimeSpan.FromSeconds(4);

    private readonly TextWriter _stderr;
    private readonly string _action;
    private readonly PosixSignalRegistration[] _registrations;
    private readonly TaskCompletionSource<PosixSignal> _first = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly CancellationTokenSource _cancel = new();
    private readonly object _gate = new();
    private Timer? _deadline;
    private readonly TimeSpan _hardDeadline;
    private int _count;
    private bool _disposed;

    /// <param name="stderr">Where the acknowledgement of a signal goes.</param>
    /// <param name="action">What the first signal makes the command do, e.g. "stopping after the current step".</param>
    /// <param name="hardDeadline">From the first signal to the forced exit (default <see cref="HardDeadline"/>): a node's
    /// preemption notice (<c>--notice-seconds</c>) sets it to the time the machine is given.</param>
    public StopSignals(TextWriter stderr, string action, TimeSpan? hardDeadline = null)
    {
        _stderr = stderr;
        _action = action;
        _hardDeadline = hardDeadline ?? HardDeadline;
        _registrations =
        [
            PosixSignalRegistration.Create(PosixSignal.SIGTERM, Handle),
            PosixSignalRegistration.Create(PosixSignal.SIGINT, Handle),
        ];
    }

    /// <summary>Completes with the first stop signal.</summary>
    public Task<PosixSignal> First => _first.Task;

    /// <summary>Completes with the first stop signal's name ("SIGTERM"): the reason a run is stopped with.</summary>
    public Task<string> Reason => _first.Task.ContinueWith(t => RunOutcome.SignalName(t.Result), TaskScheduler.Default);

    /// <summary>Cancelled by the first stop signal.</summary>
    public CancellationToken Token => _cancel.Token;

    /// <summary>The first stop signal, once one has arrived.</summary>
    public PosixSignal? Received => _first.Task.IsCompletedSuccessfully ? _first.Task.Result : null;

    private void Handle(PosixSignalContext context)
    {
        context.Cancel = true;
        string name = RunOutcome.SignalName(context.Signal);
        int code = Program.ExitCodes.ForSignal(context.Signal);
        if (Interlocked.Increment(ref _count) > 1)
        {
            ExitNow($"{name} again: exiting at once (exit code {code})", code);
            return;
        }
        Write($"{name}: {_action} (send it again to exit at once)");
        lock (_gate)
        {
            // Not once the command has returned: the process is ending anyway (or, in a test host, not ours to end).
            if (!_disposed)
                _deadline = new Timer(_ => ExitNow($"{name}: still running {_hardDeadline.TotalSeconds:F1} s after the signal; exiting now (exit code {code})", code),
                    null, _hardDeadline, Timeout.InfiniteTimeSpan);
        }
        _first.TrySetResult(context.Signal);
        _cancel.Cancel();
    }

    private void Write(string line)
    {
        try
        {
            _stderr.WriteLine(line);
            _stderr.Flush();
        }
        catch (Exception) { /* a closed stderr must not stop the stop */ }
    }

    // _exit, not Environment.Exit: exit() would run libtorch's static destructors while another thread
    // may still be inside libtorch. Metrics lose nothing (each line is one write); stdout is flushed here.
    private void ExitNow(string message, int code)
    {
        Write(message);
        try { Console.Out.Flush(); } catch (Exception) { }
        Exit(code);
    }

    [DllImport("libc", EntryPoint = "_exit")]
    private static extern void Exit(int status);

    public void Dispose()
    {
        foreach (var r in _registrations) r.Dispose();
        lock (_gate)
        {
            _disposed = true;
            _deadline?.Dispose();
        }
    }
}
