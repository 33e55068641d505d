using MessagePack;

namespace ElasticMoE.Runtime.Protocol;

// Run control: requests from outside the step protocol (an operator, a signal handler) to the
// coordinator. Same conventions as TrainingProtocol.cs: MessagePack records under IElasticMoEMessage
// with a stable manifest, found by MessageManifestRegistry's scan of this assembly.

/// <summary>
/// Anyone → coordinator: end the run early. With no step in flight the run finishes at once; otherwise
/// right after the current step commits, so every reported step is complete. The run then ends as a
/// normal finish does (final parameters, nodes told to stop), its result marked as stopped with
/// <paramref name="Reason"/>. Sent by <c>elasticmoe train</c> on SIGTERM or SIGINT; repeating it is harmless.
/// </summary>
[MessagePackObject, Manifest("t.StopRun")]
public sealed record StopRun([property: Key(0)] string Reason) : IElasticMoEMessage;

/// <summary>
/// Node agent → coordinator: this node wants to leave (SIGTERM, or the shell's request). The coordinator
/// re-plans at the next step boundary without the node's workers, moves their units to the workers that
/// stay, and then answers <see cref="LeaveGranted"/>: nothing is lost and no step is redone.
/// </summary>
[MessagePackObject, Manifest("t.RequestLeave")]
public sealed record RequestLeave([property: Key(0)] string NodeAddress, [property: Key(1)] long SystemUid) : IElasticMoEMessage
{
    /// <summary>
    /// How long the node can still wait for its leave (a preemption notice's hand-over budget, from when it asked);
    /// 0 = not said. Nodes asking together are gathered into one re-plan, but never past a third of this.
    /// </summary>
    [Key(2)] public double NoticeSeconds { get; init; }
}

/// <summary>Coordinator → node agent: the node holds nothing the run needs any more; it may leave the cluster.</summary>
[MessagePackObject, Manifest("t.LeaveGranted")]
public sealed record LeaveGranted([property: Key(0)] string NodeAddress, [property: Key(1)] long Step) : IElasticMoEMessage;
