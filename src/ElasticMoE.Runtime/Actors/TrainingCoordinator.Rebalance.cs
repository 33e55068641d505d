using ElasticMoE.Configuration;
using ElasticMoE.Planning;
using ElasticMoE.Training;

namespace ElasticMoE.Runtime.Actors;

/// <summary>
/// Load-based expert rebalancing (<c>rebalance.*</c>): the coordinator keeps the expert loads of the last
/// committed steps and, at a step boundary where <see cref="RebalanceTrigger"/> fires, plans a placement with
/// replicated hot experts (<see cref="RebalancePlanner"/>) and installs it as a re-plan: units (parameters,
/// AdamW moments, applied step) move with the re-plan's transfer and no step is lost or redone.
/// </summary>
/// <remarks>
/// Decided in <c>StartStepOrFinish</c>, so it waits naturally while a loss is recovered or an attempt is redone:
/// those never reach a step boundary. Only with PP = 1: every worker is then expert-eligible and every shard
/// is shared, so replicas need no stage-private special case; with pipeline stages it says so and does nothing.
/// </remarks>
public sealed partial class TrainingCoordinator
{
    private ExpertLoadWindow? _loadWindow;
    private RebalanceTrigger? _rebalanceTrigger;
    private bool _rebalanceRefusedSaid;

    // Every committed step's expert counts go into the window (only when rebalancing is on: nothing changes otherwise).
    private void RecordLoads(StepResult r)
    {
        var o = _config.Rebalance;
        if (o.Every <= 0) return;
        _loadWindow ??= new ExpertLoadWindow(o.Window);
        _rebalanceTrigger ??= new RebalanceTrigger(o);
        _loadWindow.Add(r.Step, r.ExpertCounts);
    }

    /// <summary>
    /// At the boundary before <paramref name="step"/>: true when a rebalance re-plan was started (the step
    /// starts once it is installed). Never with <c>rebalance.every = 0</c>.
    /// </summary>
    private bool RebalanceIfDue(long step)
    {
        if (_config.Rebalance.Every <= 0 || _loadWindow is null || _rebalanceTrigger is null || _state.Plan is not { } plan) return false;
        if (step % _config.Rebalance.Every != 0) return false;
        if (plan.Pp != 1)
        {
            if (!_rebalanceRefusedSaid) _report.Info($"rebalance skipped at step {step}: expert rebalancing needs PP = 1 (the plan has PP {plan.Pp})");
            _rebalanceRefusedSaid = true;
            return false;
        }
        if (_loadWindow.Loads() is not { } loads) return false;
        var today = ExpertPlacement.Of(plan);
        double before = today.MaxOverMean(loads);
        if (!_rebalanceTrigger.Check(step, before)) return false;
        RebalanceResult result;
        try
        {
            result = PlanRebalance(plan, loads, today);
        }
        catch (ConfigException ex)
        {
            Fail(ex.Message);
            return true;
        }
        _rebalanceTrigger.Rebalanced(result.MaxOverMeanAfter);
        if (result.CopiesMoved == 0)
        {
            _report.Info($"rebalance at step {step}: max/mean {before:F3}, no better placement within the churn budget");
            return false;
        }
        _report.RebalanceEvent(step, result.MaxOverMeanBefore, result.MaxOverMeanAfter, result.CopiesMoved);
        Replan(plan.WorldSize, plan.Pp, result.Placement);
        return true;
    }

    // The planner over the plan's workers (all expert-eligible with PP = 1), with rebalance.* validated for this layout.
    private RebalanceResult PlanRebalance(TrainingPlan plan, double[][] loads, ExpertPlacement today)
    {
        var o = _config.Rebalance;
        int experts = _config.Model.MoE.RoutedExperts;
        o.Validate(experts, plan.WorldSize);
        return RebalancePlanner.Plan(loads, today.Workers, o.SlotsPerWorker(experts, plan.WorldSize), today, o.CopiesPerRebalance(today.TotalCopies));
    }
}
