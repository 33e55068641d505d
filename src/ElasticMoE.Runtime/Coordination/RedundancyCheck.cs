using ElasticMoE.Configuration;
using ElasticMoE.Planning;
using ElasticMoE.State;

namespace ElasticMoE.Runtime.Coordination;

/// <summary>
/// Whether a plan keeps every unit on as many nodes as <c>cluster.redundancy</c> asks (r + 1: the unit's holders and
/// its mirrors). Below that the run is in a window of risk: losing the nodes that hold the only copies of some unit
/// ends it (or, with checkpoints, rolls it back). Pure: the plan says where every copy is.
/// </summary>
public static class RedundancyCheck
{
    /// <summary>What <see cref="Of"/> found: copies wanted per unit, the fewest any unit has, and the units below.</summary>
    public sealed record Result(int Wanted, int Fewest, IReadOnlyList<UnitId> Below, int Nodes)
    {
        public bool Met => Below.Count == 0;

        /// <summary>One line for status and diagnose; null when the plan meets its redundancy.</summary>
        public string? Describe() => Met ? null
            : $"below redundancy {Wanted - 1}: {Below.Count} unit(s) on fewer than {Wanted} node(s) (the fewest on {Fewest}; " +
              $"{Nodes} node(s) in the plan), so losing {Fewest} node(s) can lose state";
    }

    public static Result Of(TrainingPlan plan, ModelOptions model, int redundancy)
    {
        var nodesOf = new Dictionary<UnitId, HashSet<string>>();
        // Every rank's holdings in one pass (HoldingsOf per rank would be quadratic in the workers).
        var holdings = plan.HoldingsByRank(model);
        for (int r = 0; r < plan.WorldSize; r++)
            foreach (var u in holdings[r])
            {
                if (!nodesOf.TryGetValue(u, out var set)) nodesOf[u] = set = new HashSet<string>(StringComparer.Ordinal);
                set.Add(plan.Workers[r].NodeAddress);
            }
        int wanted = redundancy + 1;
        var below = nodesOf.Where(kv => kv.Value.Count < wanted).Select(kv => kv.Key).Order().ToList();
        int fewest = nodesOf.Count == 0 ? 0 : nodesOf.Values.Min(s => s.Count);
        return new Result(wanted, fewest, below, plan.Workers.Select(w => w.NodeAddress).Distinct().Count());
    }
}
