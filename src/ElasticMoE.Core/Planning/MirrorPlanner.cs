namespace ElasticMoE.Planning;

/// <summary>
/// Where each worker's mirrors go (<c>cluster.redundancy</c> = r): for every rank, r keepers on r distinct
/// nodes other than its own, spread over failure domains. Pure and deterministic, so a coordinator that
/// restarts (or a test) re-derives the same table.
/// </summary>
/// <remarks>
/// <para>
/// Keepers of a rank are picked one at a time. A candidate must be on a node that holds no copy yet (the
/// rank's own node, or an earlier keeper's): r + 1 distinct nodes is what lets any r of them vanish at once.
/// Among those, only the ones whose domain holds the fewest copies so far count, so with at least r + 1
/// domains no two copies share one, and with fewer the copies spread as evenly as the domains allow.
/// </para>
/// <para>
/// Low churn: among the counted candidates the rank's previous keepers (by identity) come first, in their
/// previous order, so a mirror stays where it is while its keeper is present and still valid; a moved mirror
/// costs a transfer of its unit's state at the re-plan. Then the next ranks cyclically, which spreads the
/// keeping load (rank i is kept by i + 1, i + 2, … when every worker is a node of its own) and, for one
/// mirror and no previous plan, gives what earlier versions called the buddy.
/// </para>
/// </remarks>
public static class MirrorPlanner
{
    /// <summary>
    /// [rank] → keeper ranks of <paramref name="plan"/> (at most <see cref="TrainingPlan.Redundancy"/>, fewer when
    /// the plan has fewer other nodes), preferring <paramref name="previous"/>'s keepers.
    /// </summary>
    public static int[][] Keepers(TrainingPlan plan, TrainingPlan? previous)
    {
        ArgumentNullException.ThrowIfNull(plan);
        int w = plan.WorldSize, r = plan.Redundancy;
        var result = new int[w][];
        for (int rank = 0; rank < w; rank++)
        {
            var chosen = new List<int>(Math.Max(0, r));
            if (r <= 0) { result[rank] = []; continue; }
            var usedNodes = new HashSet<string> { plan.Workers[rank].NodeAddress };
            var copiesIn = new Dictionary<string, int> { [plan.DomainOf(rank)] = 1 };
            var preferred = PreviousKeepers(plan, previous, rank);
            while (chosen.Count < r)
            {
                int best = -1, bestUse = int.MaxValue, bestPref = int.MaxValue, bestDistance = int.MaxValue;
                for (int step = 1; step < w; step++)
                {
                    int c = (rank + step) % w;
                    if (usedNodes.Contains(plan.Workers[c].NodeAddress)) continue;
                    int use = copiesIn.GetValueOrDefault(plan.DomainOf(c));
                    int pref = preferred.IndexOf(c) is var i and >= 0 ? i : int.MaxValue;
                    if (use < bestUse || (use == bestUse && (pref < bestPref || (pref == bestPref && step < bestDistance))))
                        (best, bestUse, bestPref, bestDistance) = (c, use, pref, step);
                }
                if (best < 0) break;   // no other node left: the plan is below its redundancy
                chosen.Add(best);
                usedNodes.Add(plan.Workers[best].NodeAddress);
                copiesIn[plan.DomainOf(best)] = bestUse + 1;
            }
            result[rank] = chosen.ToArray();
        }
        return result;
    }

    // The previous plan's keepers of the worker at `rank`, as ranks of `plan` (those still in it), in order.
    private static List<int> PreviousKeepers(TrainingPlan plan, TrainingPlan? previous, int rank)
    {
        if (previous is null || previous.Redundancy <= 0) return [];
        int before = previous.RankOf(plan.Workers[rank].Id);
        if (before < 0) return [];
        return previous.MirrorKeepersOf(before).Select(k => plan.RankOf(previous.Workers[k].Id)).Where(k => k >= 0).ToList();
    }

    /// <summary>
    /// <paramref name="plan"/> with its failure domains (node address → domain; a node not in the map, or a null
    /// map, is a domain of its own) and its keepers chosen against <paramref name="previous"/>. Domains stay
    /// null when every node is its own, so a plan without <c>cluster.failure-domain</c> is as it always was.
    /// </summary>
    public static TrainingPlan WithMirrors(TrainingPlan plan, TrainingPlan? previous, IReadOnlyDictionary<string, string>? domains)
    {
        ArgumentNullException.ThrowIfNull(plan);
        var named = plan.Workers.Select(s => domains is not null && domains.TryGetValue(s.NodeAddress, out var d) ? d : s.NodeAddress).ToArray();
        var withDomains = plan with { Domains = named.Where((d, i) => d != plan.Workers[i].NodeAddress).Any() ? named : null, Keepers = null };
        return plan.Redundancy <= 0 ? withDomains : withDomains with { Keepers = Keepers(withDomains, previous) };
    }
}
