using ElasticMoE.Configuration;
using ElasticMoE.State;

namespace ElasticMoE.Planning;

/// <summary>What one worker of a node that outlived its coordinator still holds (see <see cref="Reattachment"/>).</summary>
/// <param name="Previous">Its identity in the plan it holds units of (the node incarnation that installed it).</param>
/// <param name="Current">Its identity now (the node's new incarnation).</param>
/// <param name="Epoch">The epoch of that plan.</param>
/// <param name="Units">Each held unit with its applied step (last step applied, -1 none) and checksum.</param>
public sealed record HeldWorker(WorkerId Previous, WorkerSlot Current, int Epoch, IReadOnlyList<(UnitId Unit, long AppliedStep, ulong Checksum)> Units);

/// <summary>
/// A restarted coordinator's choice: adopt the units the nodes still hold (<see cref="Plan"/> non-null: the
/// journal's last plan with the returning workers' new identities; <see cref="Gone"/> are the workers of
/// that plan that did not come back) and train on from <see cref="NextStep"/>; or not, and why.
/// </summary>
public sealed record ReattachDecision(TrainingPlan? Plan, long NextStep, IReadOnlySet<WorkerId> Gone, string Why)
{
    public bool Adopt => Plan is not null;
}

/// <summary>
/// Pure rule for re-attaching the nodes of a run whose coordinator died: their units in memory are newer
/// than any checkpoint, so a coordinator started again uses them when they are consistent with its journal:
/// held under the journal's last plan, every unit at one applied step no older than the journal's next
/// step, replicas of a unit bit-identical (checksum), and every unit of the model held by some returning
/// worker. Otherwise the run goes back to its last committed checkpoint, saying why.
/// </summary>
/// <remarks>
/// Units at two different steps mean the coordinator died inside an update (some workers applied it,
/// others not): the gradients of that step died with the old incarnations' engines, so nothing can roll it
/// forward, and the checkpoint is the consistent state left.
/// </remarks>
public static class Reattachment
{
    public static ReattachDecision Decide(TrainingPlan prior, long journalNextStep, IReadOnlyList<HeldWorker> held, ModelOptions model)
    {
        static ReattachDecision No(string why) => new(null, 0, new HashSet<WorkerId>(), why);

        var returning = new Dictionary<WorkerId, HeldWorker>();
        var holdings = prior.HoldingsByRank(model);
        foreach (var h in held)
        {
            int rank = prior.RankOf(h.Previous);
            if (h.Epoch != prior.Epoch || rank < 0) continue;   // units of another plan: not comparable with the journal
            var holds = h.Units.Select(u => u.Unit).ToHashSet();
            if (!holdings[rank].All(holds.Contains)) continue;   // not all its units: count it as gone
            returning[h.Previous] = h;
        }
        if (returning.Count == 0)
            return No($"no returning node holds the units of plan {prior.Epoch}, the journal's last");

        var steps = returning.Values.SelectMany(h => h.Units.Select(u => u.AppliedStep)).Distinct().Order().ToList();
        if (steps.Count != 1)
            return No($"the nodes' units are at different steps ({string.Join(", ", steps.Select(s => s + 1))}): the coordinator died inside an update");
        long next = steps[0] + 1;
        if (next < journalNextStep)
            return No($"the nodes' units are at step {next}, behind the journal's {journalNextStep}");

        var copies = new Dictionary<UnitId, ulong>();
        foreach (var (unit, _, checksum) in returning.Values.OrderBy(h => h.Previous).SelectMany(h => h.Units))
        {
            if (copies.TryGetValue(unit, out var first) && first != checksum)
                return No($"copies of unit {unit} differ (checksums {first:x16} and {checksum:x16})");
            copies[unit] = checksum;
        }
        var missing = UnitCatalog.All(model).Where(u => !copies.ContainsKey(u)).ToList();
        if (missing.Count > 0)
            return No($"{missing.Count} unit(s) are held by no returning node (e.g. {missing[0]})");

        var workers = prior.Workers.Select(w => returning.TryGetValue(w.Id, out var h) ? h.Current : w).ToList();
        var gone = prior.Workers.Select(w => w.Id).Where(id => !returning.ContainsKey(id)).ToHashSet();
        return new ReattachDecision(prior with { Workers = workers }, next, gone,
            $"{returning.Count} of {prior.WorldSize} worker(s) of plan {prior.Epoch} returned with every unit at step {next}");
    }
}
