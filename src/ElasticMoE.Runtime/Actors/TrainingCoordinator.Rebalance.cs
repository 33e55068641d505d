using Akka.Actor;
using ElasticMoE.Runtime.Coordination;
using ElasticMoE.Runtime.Protocol;
using ElasticMoE.Training;

namespace ElasticMoE.Runtime.Actors;

/// <summary>
/// Load-based expert rebalancing (<c>rebalance.*</c>), the coordinator's side: it feeds its child
/// <see cref="Rebalancer"/> every committed step's expert loads, asks it at the step boundaries where a rebalance
/// may be due (every <c>rebalance.every</c> steps, or requested from the shell), waits for its answer in
/// <see cref="Phase.Rebalancing"/>, and installs the placement it planned as a re-plan: units (parameters, AdamW
/// moments, applied step) move with the re-plan's transfer and no step is lost or redone.
/// </summary>
/// <remarks>
/// Asked from <c>StartStepOrFinish</c>, so a request waits naturally while a loss is recovered or an attempt is
/// redone: those never reach a step boundary. A loss while the rebalancer is deciding abandons the decision and
/// keeps a request for the next boundary (not lost, not applied twice: a decision is taken at most once per
/// request, and a stale answer is fenced out by its id). Only with PP = 1: every worker is then expert-eligible and
/// every shard is shared, so replicas need no stage-private special case; with pipeline stages it says so and does
/// nothing.
/// </remarks>
public sealed partial class TrainingCoordinator
{
    private IActorRef _rebalancer = ActorRefs.Nobody;
    private bool _rebalanceRefusedSaid;
    // `rebalance now` from the shell: carried out at the next step boundary (a loss being recovered or an
    // attempt being redone reaches none, so the request waits for them), once, then cleared.
    private bool _rebalanceAsked;
    // The decision being waited for (Phase.Rebalancing), and the boundary (step) already decided, so that coming
    // back to StartStepOrFinish after it (or after the re-plan it led to) does not ask again.
    private Rebalancer.Decide? _deciding;
    private long _rebalanceIds;
    private long _rebalanceDecidedAt = -1;

    private void StartRebalancer()
    {
        _rebalancer = Context.ActorOf(Rebalancer.Props(_config), "rebalancer");
        SeedRebalancer();
    }

    // The window from the committed steps (after a journal recovery, or the rebalancer's restart): the same
    // window a coordinator that never stopped would hold, so it takes the same decisions.
    private void SeedRebalancer()
    {
        foreach (var m in Rebalancer.SeedFrom(_state.Committed, _config.Rebalance.Window)) _rebalancer.Tell(m);
    }

    // Every committed step's expert counts go to the window, kept even with rebalance.every = 0 so that a
    // requested rebalance and a dry run have loads to plan for.
    private void RecordLoads(StepResult r) => _rebalancer.Tell(new Rebalancer.LoadsCommitted(r.Step, r.ExpertCounts));

    private string? RebalanceRefusal() => Rebalancer.Refusal(_state.Plan, _state.Committed.Count > 0);

    /// <summary>
    /// At the boundary before <paramref name="step"/>: true when the rebalancer was asked (the coordinator waits for
    /// its answer; the step starts after it, or after the re-plan it leads to). Automatic only with
    /// <c>rebalance.every</c> &gt; 0; a request from the shell is planned here whatever the trigger says.
    /// </summary>
    private bool RebalanceIfDue(long step)
    {
        var plan = _state.Plan!;
        bool asked = _rebalanceAsked;
        bool automatic = _config.Rebalance.Every > 0 && step > 0 && step % _config.Rebalance.Every == 0 && _rebalanceDecidedAt != step;
        if (!asked && !automatic) return false;
        _rebalanceAsked = false;
        _rebalanceDecidedAt = step;
        if (RebalanceRefusal() is { } why)
        {
            if (asked) _report.Info($"rebalance requested but not possible at step {step}: {why}");
            else if (!_rebalanceRefusedSaid) _report.Info($"rebalance skipped at step {step}: {why}");
            _rebalanceRefusedSaid |= !asked;
            return false;
        }
        _deciding = new Rebalancer.Decide(++_rebalanceIds, step, plan, asked);
        _rebalancer.Tell(_deciding);
        Enter(Phase.Rebalancing, Rebalancing);
        return true;
    }

    private void Rebalancing()
    {
        Receive<Rebalancer.Decided>(OnRebalanceDecided);
        Common();
    }

    private void RebalanceReplies()
    {
        Receive<ShellRebalanceQuery>(_ => _rebalancer.Forward(new Rebalancer.Preview(_state.Plan)));
        Receive<Rebalancer.Restarted>(m =>
        {
            _report.Info($"the rebalancer failed and was restarted ({m.Reason}); its load window is rebuilt from the committed steps");
            SeedRebalancer();
            if (_deciding is not { } d) return;
            // Its answer is lost with it: this boundary goes on without a rebalance (a request is not retried, it
            // would fail the same way).
            _deciding = null;
            _report.Info($"no rebalance at step {d.Step}: the rebalancer failed while deciding");
            if (_phase == Phase.Rebalancing) StartStepOrFinish();
        });
        Receive<Rebalancer.Decided>(_ => { /* abandoned by a loss (the request was kept), or fenced out */ });
    }

    private void OnRebalanceDecided(Rebalancer.Decided m)
    {
        if (_deciding?.Id != m.Id) return;
        _deciding = null;
        if (m.Error is { } error)
        {
            Fail(error);
            return;
        }
        if (m.Refusal is { } why) _report.Info($"rebalance requested but not possible at step {m.Step}: {why}");
        else if (m.Result is { CopiesMoved: 0 }) _report.Info($"rebalance at step {m.Step}: max/mean {m.MaxOverMeanBefore:F3}, no better placement within the churn budget");
        if (m.Result is not { CopiesMoved: > 0 } result)
        {
            StartStepOrFinish();
            return;
        }
        Apply(new ExpertsRebalanced(m.Step, result.MaxOverMeanBefore, result.MaxOverMeanAfter, result.CopiesMoved, m.Requested));
        _report.RebalanceEvent(m.Step, result.MaxOverMeanBefore, result.MaxOverMeanAfter, result.CopiesMoved);
        Replan(_state.Plan!.WorldSize, _state.Plan.Pp, result.Placement);
    }

    // A loss while the rebalancer decides: no step is in flight; the decision is dropped (the plan it was for is
    // about to change) and a request waits for the boundary after the recovery.
    private void AbandonRebalanceDecision()
    {
        if (_deciding is not { } d) return;
        _deciding = null;
        _rebalanceDecidedAt = -1;
        if (d.Requested)
        {
            _rebalanceAsked = true;
            _report.Info($"rebalance deferred: a worker was lost while it was being planned for step {d.Step}; it is carried out at the next step boundary");
        }
    }
}
