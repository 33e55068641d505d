using MessagePack;

namespace ElasticMoE.Runtime.Protocol;

// The shell's further read commands (experts heatmap, checkpoints verify, events, actors tree, diagnose):
// same conventions as ShellProtocol.cs. `train watch` needs nothing new (it repeats ShellTrainStatusQuery).

/// <summary>A run request whose answer takes work (files read): the endpoint and the shell wait <see cref="LongTimeout"/> for it.</summary>
public interface IShellLongRequest : IShellRunRequest
{
    /// <summary>How long the endpoint waits for the coordinator's answer to a long request.</summary>
    public static readonly TimeSpan LongTimeout = TimeSpan.FromMinutes(10);
}

/// <summary>Shell → coordinator: expert loads per MoE layer over the rebalancing load window (<c>rebalance.window</c> steps).</summary>
[MessagePackObject, Manifest("s.HeatmapQuery")]
public sealed record ShellExpertHeatmapQuery : IShellRunRequest;

/// <summary>
/// Tokens per step routed to each expert, averaged over the last <c>WindowSteps</c> committed steps up to step
/// <c>Step</c> (-1 and nothing else before the first): <c>Loads[i][e]</c> for MoE block <c>Layers[i]</c>, expert e.
/// </summary>
[MessagePackObject, Manifest("s.Heatmap")]
public sealed record ShellExpertHeatmap(
    [property: Key(0)] long Step,
    [property: Key(1)] int WindowSteps,
    [property: Key(2)] int[] Layers,
    [property: Key(3)] double[][] Loads) : IElasticMoEMessage;

/// <summary>Shell → coordinator: check every file of the committed checkpoints (of step <c>Step</c> only; -1 = all) against its manifest.</summary>
[MessagePackObject, Manifest("s.VerifyQuery")]
public sealed record ShellCheckpointsVerifyQuery([property: Key(0)] long Step) : IShellLongRequest;

/// <summary>One checkpoint's verdict: its directory, and each problem found (none: every file is there with its size and SHA-256).</summary>
[MessagePackObject]
public sealed record ShellCheckpointVerdict(
    [property: Key(0)] long Step,
    [property: Key(1)] string Directory,
    [property: Key(2)] bool Ok,
    [property: Key(3)] string[] Problems);

/// <summary>The verdicts, oldest checkpoint first; <c>Ok</c> when every checkpoint verified.</summary>
[MessagePackObject, Manifest("s.Verified")]
public sealed record ShellCheckpointsVerified(
    [property: Key(0)] string RunDirectory,
    [property: Key(1)] bool Ok,
    [property: Key(2)] ShellCheckpointVerdict[] Checkpoints) : IElasticMoEMessage;

/// <summary>Shell → coordinator: the run's durable events from its journal, those recorded at step <c>Since</c> or later.</summary>
[MessagePackObject, Manifest("s.EventsQuery")]
public sealed record ShellEventsQuery([property: Key(0)] long Since) : IShellRunRequest;

/// <summary>
/// One journaled event: its sequence number, the run's step when it was recorded (steps committed so far),
/// its kind (the event's type name) and a line of text.
/// </summary>
[MessagePackObject]
public sealed record ShellEvent([property: Key(0)] long SequenceNr, [property: Key(1)] long AtStep, [property: Key(2)] string Kind, [property: Key(3)] string Text);

/// <summary>
/// The journal's events in order (every kind but the per-step <c>StepCommitted</c>), the last sequence number written, and
/// <c>Oldest</c>: the first sequence number the journal actor still holds (older ones were before its newest snapshot
/// when it recovered, or beyond its bound).
/// </summary>
[MessagePackObject, Manifest("s.Events")]
public sealed record ShellEvents(
    [property: Key(0)] long LastSequenceNr,
    [property: Key(1)] long Oldest,
    [property: Key(2)] ShellEvent[] Events) : IElasticMoEMessage;

/// <summary>
/// Shell → endpoint: the actor hierarchy under <c>Path</c> (e.g. /user) of node <c>Node</c> (an akka.tcp:// address;
/// empty = every member). Answered by the endpoint, which asks each node's <c>ActorTreeProbe</c>.
/// </summary>
[MessagePackObject, Manifest("s.ActorTreeQuery")]
public sealed record ShellActorTreeQuery([property: Key(0)] string Node, [property: Key(1)] string Path) : IElasticMoEMessage;

/// <summary>Endpoint → a node's <c>ActorTreeProbe</c>: its local actors under <c>Path</c>.</summary>
[MessagePackObject, Manifest("s.ActorTreeProbe")]
public sealed record ActorTreeRequest([property: Key(0)] string Path) : IElasticMoEMessage;

/// <summary>One actor: its path, depth below the tree's root (0 = the root) and the class it runs (empty when not known).</summary>
[MessagePackObject]
public sealed record ShellActor([property: Key(0)] string Path, [property: Key(1)] int Depth, [property: Key(2)] string Type);

/// <summary>A node's actors, depth first; <c>Answered</c> false (and why in <c>Message</c>) when its probe did not answer.</summary>
[MessagePackObject, Manifest("s.NodeTree")]
public sealed record ShellNodeTree(
    [property: Key(0)] string Node,
    [property: Key(1)] bool Answered,
    [property: Key(2)] string Message,
    [property: Key(3)] ShellActor[] Actors) : IElasticMoEMessage;

[MessagePackObject, Manifest("s.ActorTrees")]
public sealed record ShellActorTrees([property: Key(0)] ShellNodeTree[] Nodes) : IElasticMoEMessage;

/// <summary>Shell → coordinator: a health check of every node (cluster membership, registration, data plane) and of the run's progress.</summary>
[MessagePackObject, Manifest("s.DiagnoseQuery")]
public sealed record ShellDiagnoseQuery : IShellRunRequest;

/// <summary>
/// One node's health: "pass", "slow" or "fail" and the reasons for anything but a pass; its cluster status, roles and
/// reachability, and its workers registered with the run, in the plan, and with a data-plane endpoint.
/// </summary>
[MessagePackObject]
public sealed record ShellNodeHealth(
    [property: Key(0)] string Node,
    [property: Key(1)] string Verdict,
    [property: Key(2)] string Status,
    [property: Key(3)] string[] Roles,
    [property: Key(4)] bool Reachable,
    [property: Key(5)] int Workers,
    [property: Key(6)] int Planned,
    [property: Key(7)] int DataEndpoints,
    [property: Key(8)] string[] Reasons);

/// <summary>
/// Every node's health and the run's: its phase, steps committed, seconds the step in flight has taken so far (null
/// when none is), the median step time of the last 20, and the run's verdict ("slow" when the step in flight has taken
/// over 10 times that median and 30 s); <c>Ok</c> when the run and every node pass.
/// </summary>
[MessagePackObject, Manifest("s.Diagnosis")]
public sealed record ShellDiagnosis(
    [property: Key(0)] bool Ok,
    [property: Key(1)] string Phase,
    [property: Key(2)] long Step,
    [property: Key(3)] double? StepInFlightSeconds,
    [property: Key(4)] double? MedianStepSeconds,
    [property: Key(5)] string RunVerdict,
    [property: Key(6)] string[] RunReasons,
    [property: Key(7)] ShellNodeHealth[] Nodes) : IElasticMoEMessage;
