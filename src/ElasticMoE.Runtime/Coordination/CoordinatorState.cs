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

/// <summary>A new plan took effect before step <c>AtStep</c>: its units are where it says.</summary>
public sealed record PlanChanged(TrainingPlan Plan, long AtStep) : ICoordinatorEvent;

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

    public int Epoch => Plan?.Epoch ?? 0;

    public CoordinatorState Apply(ICoordinatorEvent e) => e switch
    {
        RunStarted r => this with { RunFingerprint = r.RunFingerprint, NextStep = r.StartStep },
        NodeJoined j => this with { Workers = Workers.RemoveAll(w => w.NodeAddress == j.Address).AddRange(j.Workers) },
        NodeRemoved r => this with { Workers = Workers.RemoveAll(w => w.NodeAddress == r.Address && w.Id.SystemUid == r.SystemUid) },
        PlanChanged p => this with { Plan = p.Plan },
        StepCommitted c when c.Result.Step == NextStep => this with { NextStep = NextStep + 1, Committed = Committed.Add(c.Result) },
        StepCommitted c => throw new InvalidOperationException($"step {c.Result.Step} committed while the next step is {NextStep}"),
        _ => throw new ArgumentException($"unknown coordinator event {e.GetType().Name}"),
    };
}
