using ElasticMoE.Configuration;
using ElasticMoE.State;

namespace ElasticMoE.Planning;

/// <summary>
/// Builds the next <see cref="TrainingPlan"/> when the set of workers or the parallel layout changes.
/// Every unit that changes owner costs a transfer (weights, Adam moments) at a step boundary while the
/// whole run waits, so the planner's aim besides a valid, balanced layout is to leave units where they
/// already are: survivors keep their roles and experts whenever the new layout allows it.
/// Pure and deterministic: the same inputs give the same plan, whatever order <c>available</c> is in,
/// so a coordinator that restarts (or a test) re-derives exactly the plan that was sent out.
/// </summary>
public static class ElasticPlanner
{
    /// <summary>
    /// Most workers a plan may have: data-plane tags carry a worker's rank in 12 bits.
    /// </summary>
    public const int MaxWorkers = ElasticMoEConfig.MaxWorkers;

    /// <summary>
    /// The plan for <paramref name="workers"/> workers (DP = workers / <paramref name="pp"/>) chosen from
    /// <paramref name="available"/>.
    /// <list type="bullet">
    /// <item>No <paramref name="previous"/>: the first <paramref name="workers"/> slots by <see cref="WorkerId"/>,
    /// laid out by <see cref="LayoutPlanner.Plan"/>, so a fresh run's first plan is what it always was.</item>
    /// <item>Otherwise: previous workers that are still available first (in their previous rank order), then
    /// newcomers by <see cref="WorkerId"/>; roles go to whoever already holds most of the slot's dense units,
    /// and each MoE layer's experts stay with their previous owner up to a balanced cap.</item>
    /// </list>
    /// </summary>
    /// <exception cref="ArgumentException">The request cannot be laid out; the message says why.</exception>
    /// <param name="redundancy">Mirrors of every unit not yet on r + 1 nodes in the new plan (<see cref="TrainingPlan.Redundancy"/>),
    /// placed by <see cref="MirrorPlanner"/> (keeping <paramref name="previous"/>'s keepers where still valid).</param>
    /// <param name="domains">Failure domain of each node address (<c>cluster.failure-domain</c>); a node not in it, or null, is its own.</param>
    public static TrainingPlan Next(TrainingPlan? previous, IReadOnlyList<WorkerSlot> available, int workers, int pp, ModelOptions model, int epoch,
        int redundancy = 0, IReadOnlyDictionary<string, string>? domains = null)
    {
        Validate(previous, available, workers, pp, model);
        ArgumentOutOfRangeException.ThrowIfNegative(redundancy);
        if (previous is null)
        {
            var first = available.OrderBy(s => s.Id).Take(workers).ToList();
            return MirrorPlanner.WithMirrors(LayoutPlanner.Plan(epoch, first, pp, model) with { Redundancy = redundancy }, null, domains);
        }

        var participants = Participants(previous, available, workers);
        var stages = LayoutPlanner.SplitLayers(model.Layers, pp);
        var slots = AssignRoles(previous, participants, stages, pp, model);
        var owner = AssignExperts(previous, slots, model);
        return MirrorPlanner.WithMirrors(new TrainingPlan(epoch, workers / pp, pp, stages, slots, owner) { Redundancy = redundancy }, previous, domains);
    }

    /// <summary>
    /// Why <paramref name="workers"/> workers with pipeline degree <paramref name="pp"/> cannot be laid out with
    /// <paramref name="available"/> workers present, or null when they can: the checks <see cref="Next"/> makes on
    /// the layout itself, for a caller that must refuse a request before it is planned (the shell's relayout).
    /// </summary>
    public static string? LayoutRefusal(int workers, int pp, int available, ModelOptions model)
    {
        ArgumentNullException.ThrowIfNull(model);
        if (workers < 1) return $"a plan needs at least one worker, asked for {workers}";
        if (workers > MaxWorkers) return $"a plan has at most {MaxWorkers} workers (data-plane tags carry a 12-bit rank), asked for {workers}";
        if (workers > available) return $"asked for {workers} workers but only {available} are available";
        if (pp < 1 || workers % pp != 0) return $"pipeline degree {pp} must divide the number of workers ({workers})";
        if (pp > model.Layers) return $"pipeline degree {pp} exceeds the number of layers ({model.Layers})";
        return null;
    }

    private static void Validate(TrainingPlan? previous, IReadOnlyList<WorkerSlot> available, int workers, int pp, ModelOptions model)
    {
        ArgumentNullException.ThrowIfNull(available);
        ArgumentNullException.ThrowIfNull(model);
        if (LayoutRefusal(workers, pp, available.Count, model) is { } why)
            throw new ArgumentException(why, workers < 1 || workers > MaxWorkers || workers > available.Count ? nameof(workers) : nameof(pp));
        var seen = new HashSet<WorkerId>();
        foreach (var slot in available)
        {
            if (slot is null) throw new ArgumentException("available contains a null slot", nameof(available));
            if (!seen.Add(slot.Id)) throw new ArgumentException($"worker {slot.Id} appears more than once in available", nameof(available));
        }
        if (previous is not null)
        {
            // Keeping experts in place only means something when both plans name the same experts.
            int moeLayers = model.Layers - model.DenseLayers;
            if (previous.ExpertOwner.Length != moeLayers || previous.ExpertOwner.Any(row => row.Length != model.MoE.RoutedExperts))
                throw new ArgumentException(
                    $"the previous plan (epoch {previous.Epoch}) was made for a different model: it places " +
                    $"{previous.ExpertOwner.Length} MoE layers of {previous.ExpertOwner.FirstOrDefault()?.Length ?? 0} experts, " +
                    $"the model has {moeLayers} of {model.MoE.RoutedExperts}", nameof(previous));
        }
    }

    /// <summary>
    /// Survivors first, in their previous rank order, so that shrinking keeps the workers that already
    /// hold state and growing adds newcomers in a fixed (WorkerId) order. Slots come from
    /// <paramref name="available"/>: it has the current data endpoint.
    /// </summary>
    private static List<WorkerSlot> Participants(TrainingPlan previous, IReadOnlyList<WorkerSlot> available, int workers)
    {
        var byId = available.ToDictionary(s => s.Id);
        var result = new List<WorkerSlot>(workers);
        var taken = new HashSet<WorkerId>();
        foreach (var old in previous.Workers)
            if (byId.TryGetValue(old.Id, out var slot) && taken.Add(old.Id)) result.Add(slot);
        foreach (var slot in available.Where(s => !taken.Contains(s.Id)).OrderBy(s => s.Id))
            result.Add(slot);
        return result.Take(workers).ToList();
    }

    /// <summary>
    /// How much a dense unit counts when choosing roles: one per weight block, embedding and head. A router
    /// bias is a few floats that travels with its block, so it does not tip the choice.
    /// </summary>
    private static int Weight(UnitId unit) => unit.Kind == UnitKind.RouterBias ? 0 : 1;

    /// <summary>
    /// Slot r (rank r = replica·Pp + stage) goes to a participant by a greedy maximum-overlap matching:
    /// repeatedly take the (participant, slot) pair whose participant already holds the most weight of the
    /// slot's dense units; ties go to the participant earlier in the participant order, then to the lower slot.
    /// With an unchanged layout this gives every worker back its own rank, so nothing moves.
    /// </summary>
    private static List<WorkerSlot> AssignRoles(TrainingPlan previous, List<WorkerSlot> participants, StageRange[] stages, int pp, ModelOptions model)
    {
        int w = participants.Count;
        var stageUnits = stages.Select(s => UnitCatalog.StageUnits(model, s.First, s.End).ToArray()).ToArray();

        // Overlap depends only on (previous stage, new stage): compute it once per pair.
        var previousStageUnits = previous.Stages.Select(s => UnitCatalog.StageUnits(model, s.First, s.End).ToHashSet()).ToArray();
        var overlap = new int[previousStageUnits.Length, stages.Length];
        for (int a = 0; a < previousStageUnits.Length; a++)
            for (int b = 0; b < stages.Length; b++)
                overlap[a, b] = stageUnits[b].Where(previousStageUnits[a].Contains).Sum(Weight);

        var pairs = new List<(int Score, int Participant, int Slot)>(w * w);
        for (int p = 0; p < w; p++)
        {
            int oldRank = previous.RankOf(participants[p].Id);
            for (int r = 0; r < w; r++)
                pairs.Add((oldRank < 0 ? 0 : overlap[previous.StageOf(oldRank), r % pp], p, r));
        }
        pairs.Sort((x, y) => x.Score != y.Score ? y.Score.CompareTo(x.Score)
                           : x.Participant != y.Participant ? x.Participant.CompareTo(y.Participant)
                           : x.Slot.CompareTo(y.Slot));

        var slots = new WorkerSlot?[w];
        var placed = new bool[w];
        int left = w;
        foreach (var (_, p, r) in pairs)
        {
            if (placed[p] || slots[r] is not null) continue;
            slots[r] = participants[p];
            placed[p] = true;
            if (--left == 0) break;
        }
        return slots.Select(s => s!).ToList();
    }

    /// <summary>
    /// Per MoE layer: every worker gets ⌊E/W⌋ experts, and E mod W of them one more. The extra ones go to
    /// the workers that already hold the most experts of the layer (so as few as possible must shed one),
    /// ties in the order <see cref="LayoutPlanner.RoundRobin"/> would give them out for that layer. Then
    /// each expert stays with its previous owner while that owner is under its cap (lowest expert index
    /// first), and the rest go one by one to the worker under cap with the fewest experts so far
    /// (ties: lowest rank).
    /// </summary>
    private static int[][] AssignExperts(TrainingPlan previous, List<WorkerSlot> slots, ModelOptions model)
    {
        int w = slots.Count;
        int experts = model.MoE.RoutedExperts;
        var newRank = new Dictionary<WorkerId, int>();
        for (int r = 0; r < w; r++) newRank[slots[r].Id] = r;
        // previous rank → new rank, -1 for workers that do not take part any more.
        var present = previous.Workers.Select(s => newRank.TryGetValue(s.Id, out var r) ? r : -1).ToArray();
        // A previous owner that is gone left its experts' current state on its mirror keepers: the first of
        // them still present keeps them (no transfer), as if it had owned them. All keepers gone too: unkept.
        var carried = present.Select((c, o) => c >= 0 ? c
            : previous.MirrorKeepersOf(o).Select(k => present[k]).FirstOrDefault(k => k >= 0, -1)).ToArray();

        var result = new int[previous.ExpertOwner.Length][];
        for (int layer = 0; layer < result.Length; layer++)
        {
            var keeper = previous.ExpertOwner[layer].Select(o => o >= 0 && o < carried.Length ? carried[o] : -1).ToArray();
            var held = new int[w];
            foreach (var k in keeper) if (k >= 0) held[k]++;

            int floor = experts / w, extra = experts % w;
            var cap = Enumerable.Repeat(floor, w).ToArray();
            int l = layer;
            foreach (var r in Enumerable.Range(0, w)
                         .OrderByDescending(r => held[r])
                         .ThenBy(r => ((r - l) % w + w) % w)
                         .Take(extra))
                cap[r]++;

            var owner = Enumerable.Repeat(-1, experts).ToArray();
            var count = new int[w];
            for (int e = 0; e < experts; e++)
            {
                int k = keeper[e];
                if (k >= 0 && count[k] < cap[k]) { owner[e] = k; count[k]++; }
            }
            for (int e = 0; e < experts; e++)
            {
                if (owner[e] >= 0) continue;
                int best = -1;
                for (int r = 0; r < w; r++)
                    if (count[r] < cap[r] && (best < 0 || count[r] < count[best])) best = r;
                owner[e] = best;   // the caps sum to E, so some worker is always under its cap
                count[best]++;
            }
            result[layer] = owner;
        }
        return result;
    }
}
