using System.Collections.Immutable;
using ElasticMoE.Planning;
using ElasticMoE.Training;

namespace ElasticMoE.Runtime.Coordination;

/// <summary>
/// A fact about the run that must survive a coordinator crash. The coordinator changes its durable state
/// only by applying one of these (<see cref="CoordinatorState.Apply"/>), so journaling them (the
/// checkpoint issue) is enough to rebuild it.
/// </summary>
public interface ICoordinatorEvent;

/// <summary>The run began: what defines it (run fingerprint: model, train options, data, seed) and where it starts.</summary>
public sealed record RunStarted(string RunFingerprint, long Seed, long StartStep) : ICoordinatorEvent;

/// <summary>A node was accepted into the run with these workers.</summary>
public sealed record NodeJoined(string Address, long SystemUid, IReadOnlyList<WorkerSlot> Workers) : ICoordinatorEvent;

/// <summary>A node is gone (left, lost, or stopped); its workers can no longer be planned.</summary>
public sealed record NodeRemoved(string Address, long SystemUid, string Why) : ICoordinatorEvent;

/// <summary>
/// A node stopped answering (its process or machine died, or the network cut it off) at step <c>AtStep</c>;
/// unlike <see cref="NodeRemoved"/> it was not asked to go, so its units are lost unless a peer holds them.
/// </summary>
public sealed record NodeLost(string Address, long SystemUid, string Why, long AtStep) : ICoordinatorEvent;

/// <summary>One file of a committed checkpoint: its path relative to the checkpoint directory, size and SHA-256 (lower-case hex).</summary>
public sealed record CheckpointFile(string Path, long Length, string Sha256);

/// <summary>
/// Every file of the checkpoint of step <c>Step</c> (the state after steps 0..Step-1) is durable and
/// listed in a manifest whose SHA-256 is <c>ManifestSha256</c>: the commit point of a checkpoint.
/// </summary>
public sealed record CheckpointCommitted(long Step, string ManifestSha256, IReadOnlyList<CheckpointFile> Files) : ICoordinatorEvent;

/// <summary>Units of plan <c>Epoch</c> that changed hands (experts moved by a re-plan or a rebalance), all verified on arrival.</summary>
public sealed record ExpertsMoved(int Epoch, IReadOnlyList<UnitTransfer> Moves) : ICoordinatorEvent;

/// <summary>A new plan took effect before step <c>AtStep</c>: its units are where it says.</summary>
public sealed record PlanChanged(TrainingPlan Plan, long AtStep) : ICoordinatorEvent;

/// <summary>
/// A restarted coordinator resumes the run from the checkpoint of step <c>Step</c> (0: from the seed, no
/// checkpoint verified): steps after it are to be done again, and the nodes and plan of the previous
/// incarnation are gone (nodes come back as new incarnations and the first plan loads the checkpoint).
/// </summary>
public sealed record RunResumed(long Step) : ICoordinatorEvent;

/// <summary>
/// A loss left units of the run with no copy in memory (<c>LostUnits</c>, every holder and mirror gone) before
/// step <c>FromStep</c>, and the run went back to its newest verified checkpoint, of step <c>ToStep</c>, in place:
/// the surviving nodes stay registered and load their units of that checkpoint, and the steps from <c>ToStep</c>
/// on are done again (with the canonical reduction, to the same bits). Unlike <see cref="RunResumed"/> no process
/// restarted, so the workers are kept; the plan is gone (its units are not where it says any more).
/// </summary>
public sealed record RolledBack(long FromStep, long ToStep, IReadOnlyList<string> LostUnits) : ICoordinatorEvent;

/// <summary>
/// A coordinator started again on this journal: the nodes of the previous incarnation are not registered
/// with it (they come back, if at all, as new node incarnations), and no plan is installed by it yet. What
/// was trained stays: the next step, the committed steps, the checkpoints. The plan the journal held is
/// the one returning nodes may still hold units of (<see cref="WorkersAdopted"/>).
/// </summary>
public sealed record CoordinatorRestarted(long AtStep) : ICoordinatorEvent;

/// <summary>
/// The restarted coordinator adopted the units the returning nodes held in memory instead of a checkpoint:
/// they are where <c>Plan</c> says (the journal's last plan under the workers' new identities), every one
/// at step <c>NextStep</c>, which may be past the journal's last committed step (commits it never wrote).
/// </summary>
public sealed record WorkersAdopted(long NextStep, TrainingPlan Plan) : ICoordinatorEvent;

/// <summary>The coordinator ended the run (finished, or stopped on request) before step <c>NextStep</c>: <c>How</c> says which.</summary>
public sealed record RunEnded(long NextStep, string How) : ICoordinatorEvent;

/// <summary>
/// A rebalance was decided before step <c>Step</c> (on the trigger, or requested): worker max/mean load over the
/// window before and as planned after, and the expert copies it moves. The placement itself is the next
/// <see cref="PlanChanged"/>'s.
/// </summary>
public sealed record ExpertsRebalanced(long Step, double MaxOverMeanBefore, double MaxOverMeanAfter, int CopiesMoved, bool Requested) : ICoordinatorEvent;

/// <summary>
/// A control command of the actor shell was accepted (the token was right) before step <c>Step</c>: its name
/// ("pause", "relayout", "node-leave", ...) and arguments as the coordinator took them. Recorded when accepted;
/// what it then did shows in the events that follow (a <see cref="PlanChanged"/>, a <see cref="NodeRemoved"/>).
/// </summary>
public sealed record ShellCommandIssued(long Step, string Command, string[] Args) : ICoordinatorEvent;

/// <summary>A committed checkpoint is being deleted (retention): recorded before its files go.</summary>
public sealed record CheckpointRetired(long Step, string ManifestSha256) : ICoordinatorEvent;

/// <summary>Step <c>Result.Step</c> is applied by every unit: the commit point of a step.</summary>
public sealed record StepCommitted(StepResult Result, int Attempts) : ICoordinatorEvent;

/// <summary>The value the events build: everything the coordinator knows that outlives a step attempt.</summary>
public sealed record CoordinatorState(
    string? RunFingerprint,
    long NextStep,
    ImmutableList<WorkerSlot> Workers,
    TrainingPlan? Plan,
    ImmutableList<StepResult> Committed)
{
    public static CoordinatorState Empty { get; } = new(null, 0, ImmutableList<WorkerSlot>.Empty, null, ImmutableList<StepResult>.Empty);

    /// <summary>Committed checkpoints, oldest first: resume uses the newest that verifies.</summary>
    public ImmutableList<CheckpointCommitted> Checkpoints { get; init; } = ImmutableList<CheckpointCommitted>.Empty;

    /// <summary>How the run ended when its coordinator ended it; null while it runs, and again once a coordinator restarts it.</summary>
    public string? Ended { get; init; }

    /// <summary>The shell's accepted control commands, oldest first (the run's audit trail of operator actions).</summary>
    public ImmutableList<ShellCommandIssued> ShellCommands { get; init; } = ImmutableList<ShellCommandIssued>.Empty;

    public int Epoch => Plan?.Epoch ?? 0;

    public CoordinatorState Apply(ICoordinatorEvent e) => e switch
    {
        RunStarted r => this with { RunFingerprint = r.RunFingerprint, NextStep = r.StartStep },
        NodeJoined j => this with { Workers = Workers.RemoveAll(w => w.NodeAddress == j.Address).AddRange(j.Workers) },
        NodeRemoved r => this with { Workers = Workers.RemoveAll(w => w.NodeAddress == r.Address && w.Id.SystemUid == r.SystemUid) },
        NodeLost l => this with { Workers = Workers.RemoveAll(w => w.NodeAddress == l.Address && w.Id.SystemUid == l.SystemUid) },
        CheckpointCommitted c when c.Step > NextStep => throw new InvalidOperationException($"checkpoint of step {c.Step} committed while the next step is {NextStep}"),
        CheckpointCommitted c => this with { Checkpoints = Checkpoints.Add(c) },
        // The plan of that epoch already says where every unit is; the event records what travelled.
        ExpertsMoved => this,
        PlanChanged p => this with { Plan = p.Plan },
        RunResumed r when r.Step > NextStep => throw new InvalidOperationException($"resumed from step {r.Step} while the next step is {NextStep}"),
        RunResumed r => this with
        {
            NextStep = r.Step, Plan = null, Workers = ImmutableList<WorkerSlot>.Empty,
            Committed = Committed.RemoveAll(c => c.Step >= r.Step),
        },
        RolledBack r when r.ToStep > NextStep => throw new InvalidOperationException($"rolled back to step {r.ToStep} while the next step is {NextStep}"),
        RolledBack r when !Checkpoints.Any(c => c.Step == r.ToStep) => throw new InvalidOperationException($"rolled back to step {r.ToStep}, which has no committed checkpoint"),
        RolledBack r => this with { NextStep = r.ToStep, Plan = null, Committed = Committed.RemoveAll(c => c.Step >= r.ToStep) },
        CoordinatorRestarted => this with { Plan = null, Workers = ImmutableList<WorkerSlot>.Empty, Ended = null },
        RunEnded r => this with { Ended = r.How },
        ExpertsRebalanced => this,
        ShellCommandIssued c => this with { ShellCommands = ShellCommands.Add(c) },
        WorkersAdopted a when a.NextStep < NextStep => throw new InvalidOperationException($"adopted units at step {a.NextStep} while the next step is {NextStep}"),
        WorkersAdopted a => this with { NextStep = a.NextStep, Plan = a.Plan },
        CheckpointRetired r => this with { Checkpoints = Checkpoints.RemoveAll(c => c.Step == r.Step && c.ManifestSha256 == r.ManifestSha256) },
        StepCommitted c when c.Result.Step == NextStep => this with { NextStep = NextStep + 1, Committed = Committed.Add(c.Result) },
        StepCommitted c => throw new InvalidOperationException($"step {c.Result.Step} committed while the next step is {NextStep}"),
        _ => throw new ArgumentException($"unknown coordinator event {e.GetType().Name}"),
    };
}
