using ElasticMoE.Configuration;
using ElasticMoE.Planning;
using ElasticMoE.Runtime.Coordination;
using ElasticMoE.Runtime.Protocol;
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
    // `rebalance now` from the shell: carried out at the next step boundary (a loss being recovered or an
    // attempt being redone reaches none, so the request waits for them), once, then cleared.
    private bool _rebalanceAsked;

    // Every committed step's expert counts go into the window: a few longs per expert, kept even with
    // rebalance.every = 0 so that a requested rebalance and a dry run have loads to plan for.
    private void RecordLoads(StepResult r)
    {
        var o = _config.Rebalance;
        _loadWindow ??= new ExpertLoadWindow(o.Window);
        _rebalanceTrigger ??= new RebalanceTrigger(o);
        _loadWindow.Add(r.Step, r.ExpertCounts);
    }

    /// <summary>
    /// At the boundary before <paramref name="step"/>: true when a rebalance re-plan was started (the step
    /// starts once it is installed). Automatic only with <c>rebalance.every</c> &gt; 0; a request from the shell
    /// is carried out here whatever the trigger says.
    /// </summary>
    private bool RebalanceIfDue(long step)
    {
        bool asked = _rebalanceAsked;
        _rebalanceAsked = false;
        bool automatic = _config.Rebalance.Every > 0 && step % _config.Rebalance.Every == 0;
        if (!asked && !automatic) return false;
        if (RebalanceRefusal() is { } why)
        {
            if (asked) _report.Info($"rebalance requested but not possible at step {step}: {why}");
            else if (!_rebalanceRefusedSaid) _report.Info($"rebalance skipped at step {step}: {why}");
            _rebalanceRefusedSaid |= !asked;
            return false;
        }
        var plan = _state.Plan!;
        var loads = _loadWindow!.Loads()!;
        var today = ExpertPlacement.Of(plan);
        double before = today.MaxOverMean(loads);
        if (!asked && !_rebalanceTrigger!.Check(step, before)) return false;
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
        _rebalanceTrigger!.Rebalanced(result.MaxOverMeanAfter);
        if (result.CopiesMoved == 0)
        {
            _report.Info($"rebalance at step {step}: max/mean {before:F3}, no better placement within the churn budget");
            return false;
        }
        Apply(new ExpertsRebalanced(step, result.MaxOverMeanBefore, result.MaxOverMeanAfter, result.CopiesMoved, asked));
        _report.RebalanceEvent(step, result.MaxOverMeanBefore, result.MaxOverMeanAfter, result.CopiesMoved);
        Replan(plan.WorldSize, plan.Pp, result.Placement);
        return true;
    }

    // Why no rebalance can be planned now, or null.
    private string? RebalanceRefusal()
    {
        if (_state.Plan is not { } plan) return "no plan is installed yet";
        if (plan.Pp != 1) return $"expert rebalancing needs PP = 1 (the plan has PP {plan.Pp})";
        if (_loadWindow?.Loads() is null) return "no step committed yet: no expert loads to plan for";
        return null;
    }

    /// <summary>`rebalance now --dry-run`: what a rebalance would do now, planned on the current window; nothing is applied.</summary>
    private ShellRebalancePreview RebalancePreview()
    {
        if (RebalanceRefusal() is { } why) return new ShellRebalancePreview(false, why, double.NaN, double.NaN, 0, 0);
        var plan = _state.Plan!;
        var loads = _loadWindow!.Loads()!;
        try
        {
            var r = PlanRebalance(plan, loads, ExpertPlacement.Of(plan));
            return new ShellRebalancePreview(true, r.CopiesMoved == 0 ? "no better placement within the churn budget" : $"would move {r.CopiesMoved} expert cop(ies)",
                r.MaxOverMeanBefore, r.MaxOverMeanAfter, r.CopiesMoved, _loadWindow.Count);
        }
        catch (ConfigException ex)
        {
            return new ShellRebalancePreview(false, ex.Message, double.NaN, double.NaN, 0, 0);
        }
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
