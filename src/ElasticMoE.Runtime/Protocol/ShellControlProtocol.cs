using MessagePack;

namespace ElasticMoE.Runtime.Protocol;

// The actor shell's control commands that take arguments (`relayout 2x1`, `node leave ADDRESS`, `node down
// ADDRESS`, `fault kill-worker ADDRESS`), and what the coordinator tells a node to carry one out. Same
// conventions as ShellProtocol.cs; the reply is a ShellAck. Every accepted command is journaled
// (ShellCommandIssued) and carried out at a step boundary.

/// <summary>
/// Shell → coordinator: control command <c>Action</c> ("relayout", "node-leave", "node-down", "fault-kill-worker")
/// with its arguments (relayout: workers and PP; the node commands: a member address), with the shell token.
/// </summary>
[MessagePackObject, Manifest("s.ControlCommand")]
public sealed record ShellControlCommand([property: Key(0)] string Action, [property: Key(1)] string[] Args, [property: Key(2)] string Token) : IShellRunRequest;

/// <summary>
/// Coordinator → node agent (`node leave`): leave the run as a SIGTERM on the node does: ask the coordinator to
/// hand this node's units over (<see cref="RequestLeave"/>), and once it grants the leave, leave the cluster and stop.
/// </summary>
[MessagePackObject, Manifest("s.NodeLeaveOrder")]
public sealed record NodeLeaveOrder([property: Key(0)] string Reason) : IElasticMoEMessage;

/// <summary>
/// Coordinator → node agent (`fault kill-worker`, a recovery drill): SIGKILL this node's process, as
/// <c>cluster.fault-injection</c> with <c>action=kill</c> does. Only sent to a node in a process of its own.
/// </summary>
[MessagePackObject, Manifest("s.NodeKillOrder")]
public sealed record NodeKillOrder([property: Key(0)] string Reason) : IElasticMoEMessage;
