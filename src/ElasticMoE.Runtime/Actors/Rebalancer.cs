using Akka.Actor;
using ElasticMoE.Configuration;
using ElasticMoE.Planning;
using ElasticMoE.Runtime.Protocol;
using ElasticMoE.Training;

namespace ElasticMoE.Runtime.Actors;

/// <summary>
/// Decides expert rebalances for the coordinator (its parent): keeps the expert loads of the last
/// <c>rebalance.window</c> committed steps, answers at a step boundary whether a rebalance is due there and with
/// which placement (<see cref="RebalanceTrigger"/>, <see cref="RebalancePlanner"/>), and answers dry runs from the
/// shell. The coordinator owns the when-is-a-boundary and carries the placement out as a re-plan; planning runs
/// here, off the coordinator's thread, so the coordinator keeps answering (shell queries, losses) while it plans.
/// </summary>
/// <remarks>
/// Supervision: the coordinator's default strategy restarts it on a failure. What it holds is derived from the
/// journal (the last window's <see cref="StepCommitted"/> counts), so a restart loses nothing: it tells its parent
/// (<see cref="Restarted"/>) and the coordinator sends the window again (<see cref="SeedFrom"/>), as it does after
/// it recovers from its journal. Only the trigger's hysteresis bar starts over at the threshold.
/// </remarks>
public sealed class Rebalancer : ReceiveActor
{
    /// <summary>Coordinator → rebalancer: a committed step's expert counts, [MoE layer][expert] (a step sent twice replaces itself).</summary>
    public sealed record LoadsCommitted(long Step, IReadOnlyList<IReadOnlyList<long>> Counts);

    /// <summary>
    /// Coordinator → rebalancer, at the boundary before <c>Step</c> under <c>Plan</c>: is a rebalance due (always
    /// planned when <c>Requested</c>; else when the trigger fires), and where would the experts go?
    /// </summary>
    public sealed record Decide(long Id, long Step, TrainingPlan Plan, bool Requested);

    /// <summary>
    /// The answer to <see cref="Decide"/> <c>Id</c>: a planned rebalance (<c>Result</c>), or none — <c>Refusal</c> says
    /// why a requested one cannot be planned, <c>Error</c> that rebalance.* cannot work for this layout (a config error),
    /// neither = the trigger did not fire.
    /// </summary>
    public sealed record Decided(long Id, long Step, bool Requested, RebalanceResult? Result, double MaxOverMeanBefore, string? Refusal, string? Error);

    /// <summary>Coordinator → rebalancer (forwarded from the shell): a dry run on <c>Plan</c>; answered to the sender with a <see cref="ShellRebalancePreview"/>.</summary>
    public sealed record Preview(TrainingPlan? Plan);

    /// <summary>Rebalancer → parent after a restart: its window is empty, send it again.</summary>
    public sealed record Restarted(string Reason);

    private readonly RebalanceOptions _options;
    private readonly int _experts;
    private readonly ExpertLoadWindow _window;
    private readonly RebalanceTrigger _trigger;

    public Rebalancer(ElasticMoEConfig config)
    {
        _options = config.Rebalance;
        _experts = config.Model.MoE.RoutedExperts;
        _window = new ExpertLoadWindow(_options.Window);
        _trigger = new RebalanceTrigger(_options);
        Receive<LoadsCommitted>(m => _window.Add(m.Step, m.Counts));
        Receive<Decide>(m => Sender.Tell(OnDecide(m)));
        Receive<Preview>(m => Sender.Tell(OnPreview(m.Plan)));
    }

    public static Props Props(ElasticMoEConfig config) => Akka.Actor.Props.Create(() => new Rebalancer(config));

    /// <summary>The committed steps whose counts make the window (the last <paramref name="window"/>), oldest first.</summary>
    public static IEnumerable<LoadsCommitted> SeedFrom(IReadOnlyList<StepResult> committed, int window) =>
        committed.Skip(Math.Max(0, committed.Count - window)).Select(r => new LoadsCommitted(r.Step, r.ExpertCounts));

    /// <summary>Why no rebalance can be planned under <paramref name="plan"/>, or null. Pure: the coordinator asks it before accepting a request.</summary>
    public static string? Refusal(TrainingPlan? plan, bool haveLoads)
    {
        if (plan is null) return "no plan is installed yet";
        if (plan.Pp != 1) return $"expert rebalancing needs PP = 1 (the plan has PP {plan.Pp})";
        if (!haveLoads) return "no step committed yet: no expert loads to plan for";
        return null;
    }

    protected override void PostRestart(Exception reason)
    {
        base.PostRestart(reason);
        Context.Parent.Tell(new Restarted(reason.Message));
    }

    private Decided OnDecide(Decide m)
    {
        if (Refusal(m.Plan, _window.Count > 0) is { } why) return new Decided(m.Id, m.Step, m.Requested, null, double.NaN, why, null);
        var loads = _window.Loads()!;
        var today = ExpertPlacement.Of(m.Plan);
        double before = today.MaxOverMean(loads);
        if (!m.Requested && !_trigger.Check(m.Step, before)) return new Decided(m.Id, m.Step, false, null, before, null, null);
        RebalanceResult result;
        try
        {
            result = Plan(m.Plan, loads, today);
        }
        catch (ConfigException ex)
        {
            return new Decided(m.Id, m.Step, m.Requested, null, before, null, ex.Message);
        }
        _trigger.Rebalanced(result.MaxOverMeanAfter);
        return new Decided(m.Id, m.Step, m.Requested, result, before, null, null);
    }

    private ShellRebalancePreview OnPreview(TrainingPlan? plan)
    {
        if (Refusal(plan, _window.Count > 0) is { } why) return new ShellRebalancePreview(false, why, double.NaN, double.NaN, 0, 0);
        try
        {
            var r = Plan(plan!, _window.Loads()!, ExpertPlacement.Of(plan!));
            return new ShellRebalancePreview(true, r.CopiesMoved == 0 ? "no better placement within the churn budget" : $"would move {r.CopiesMoved} expert cop(ies)",
                r.MaxOverMeanBefore, r.MaxOverMeanAfter, r.CopiesMoved, _window.Count);
        }
        catch (ConfigException ex)
        {
            return new ShellRebalancePreview(false, ex.Message, double.NaN, double.NaN, 0, 0);
        }
    }

    // The planner over the plan's workers (all expert-eligible with PP = 1), with rebalance.* validated for this layout.
    private RebalanceResult Plan(TrainingPlan plan, double[][] loads, ExpertPlacement today)
    {
        _options.Validate(_experts, plan.WorldSize);
        return RebalancePlanner.Plan(loads, today.Workers, _options.SlotsPerWorker(_experts, plan.WorldSize), today, _options.CopiesPerRebalance(today.TotalCopies));
    }
}
