using System.Runtime.InteropServices;

namespace ElasticMoE.Runtime.Hosting;

/// <summary>
/// How a run, or one node's part in it, ended: decided where the fact is known (a signal handler, the
/// coordinator's <see cref="Protocol.RunEnd"/>, a refusal, a lost coordinator) and carried as a type,
/// so exit codes never depend on the wording of a message. <c>elasticmoe</c> maps each case to a
/// documented exit code (README, "Using it").
/// </summary>
public abstract record RunOutcome
{
    private RunOutcome() { }

    /// <summary>One line for a human: what happened, with the reason where there is one.</summary>
    public abstract string Message { get; }

    /// <summary>Every step ran (or the time limit ended the run after a complete step).</summary>
    public sealed record Finished : RunOutcome
    {
        public override string Message => "training finished";
    }

    /// <summary>This process received <paramref name="Signal"/> and stopped; <paramref name="Detail"/> says after which step, or what was cut short.</summary>
    public sealed record Stopped(PosixSignal Signal, string Detail) : RunOutcome
    {
        public override string Message => $"stopped by {SignalName(Signal)}{(Detail.Length > 0 ? " " + Detail : "")}";
    }

    /// <summary>The coordinator stopped the run early on request (its own SIGTERM, say); for a node, not a failure of its own.</summary>
    public sealed record RunStopped(string Reason) : RunOutcome
    {
        public override string Message => Reason;
    }

    /// <summary>The loss or the gradient norm stopped being finite.</summary>
    public sealed record Diverged(string Reason) : RunOutcome
    {
        public override string Message => Reason;
    }

    /// <summary>The run stopped on an error: a lost or departed node, a failing worker, a stuck step, replicas that disagree.</summary>
    public sealed record Failed(string Reason) : RunOutcome
    {
        public override string Message => Reason;
    }

    /// <summary>The coordinator refused this node (a different model config or seed, or a run already under way).</summary>
    public sealed record Refused(string Reason) : RunOutcome
    {
        public override string Message => "refused: " + Reason;
    }

    /// <summary>This node's coordinator became unreachable or left before it ended the run.</summary>
    public sealed record CoordinatorLost(string Coordinator, string What) : RunOutcome
    {
        /// <summary>A node incarnation that waited for a coordinator to adopt its units and none came: the node ends.</summary>
        public bool WaitedInVain { get; init; }

        public override string Message => $"coordinator {Coordinator} {What}";
    }

    /// <summary>"SIGTERM", "SIGINT", … (<see cref="PosixSignal"/>'s own names are those already).</summary>
    public static string SignalName(PosixSignal signal) => signal.ToString();
}
