using ElasticMoE.Configuration;
using ElasticMoE.Planning;
using ElasticMoE.State;

namespace ElasticMoE.Tests.Planning;

/// <summary>Workers, models and plan checks shared by the planner tests.</summary>
internal static class PlanningKit
{
    public static WorkerSlot Slot(string node, int device = 0, long uid = 1)
        => new(new WorkerId(node, uid, device), $"{node}:{9000 + device}");

    /// <summary>Named like <see cref="LayoutPlannerTests"/>'s workers: node0, node1, … (one device each).</summary>
    public static List<WorkerSlot> Workers(int n) => Enumerable.Range(0, n).Select(i => Slot($"node{i}")).ToList();

    /// <summary>The identities of <see cref="Workers"/>.</summary>
    public static WorkerId[] Ids(int n) => Workers(n).Select(s => s.Id).ToArray();

    /// <summary>4 layers (1 dense, 3 MoE) of 8 routed experts unless told otherwise.</summary>
    public static ModelOptions SmallModel(int layers = 4, int experts = 8)
        => TestSupport.SmallConfig(("model.layers", layers.ToString()), ("model.moe.routed-experts", experts.ToString())).Model;

    public static List<T> Shuffled<T>(IEnumerable<T> items, int seed)
    {
        var list = items.ToList();
        var rng = new Random(seed);
        for (int i = list.Count - 1; i > 0; i--)
        {
            int j = rng.Next(i + 1);
            (list[i], list[j]) = (list[j], list[i]);
        }
        return list;
    }

    /// <summary>Units each worker holds under a plan, by identity.</summary>
    public static Dictionary<WorkerId, HashSet<UnitId>> Holdings(TrainingPlan plan, ModelOptions model)
        => Enumerable.Range(0, plan.WorldSize).ToDictionary(r => plan.Workers[r].Id, r => plan.UnitsOf(r, model).ToHashSet());

    /// <summary>Owner (by identity) of expert e of MoE layer l.</summary>
    public static WorkerId OwnerId(TrainingPlan plan, int layer, int expert) => plan.Workers[plan.ExpertOwner[layer][expert]].Id;

    /// <summary>What any plan must satisfy: a well-formed layout, every unit held, experts balanced per layer.</summary>
    public static void AssertValid(TrainingPlan plan, ModelOptions model)
    {
        Assert.Equal(plan.WorldSize, plan.Dp * plan.Pp);
        Assert.Equal(plan.WorldSize, plan.Workers.Select(w => w.Id).Distinct().Count());
        Assert.Equal(LayoutPlanner.SplitLayers(model.Layers, plan.Pp), plan.Stages);
        Assert.Equal(UnitCatalog.All(model), plan.Holders(model).Keys.Order());
        Assert.Equal(model.Layers - model.DenseLayers, plan.ExpertOwner.Length);
        foreach (var row in plan.ExpertOwner)
        {
            Assert.Equal(model.MoE.RoutedExperts, row.Length);
            Assert.All(row, o => Assert.InRange(o, 0, plan.WorldSize - 1));
            var load = Enumerable.Range(0, plan.WorldSize).Select(r => row.Count(o => o == r)).ToList();
            Assert.True(load.Max() - load.Min() <= 1, $"expert loads {string.Join(",", load)} are not balanced");
        }
    }

    /// <summary>
    /// Experts stay put as much as a balanced layout allows: each surviving worker keeps min(held before,
    /// holds now) of its experts, and the extra experts (E mod W) went to workers that could keep one more,
    /// so the number kept is the best any balanced layout of these workers could do.
    /// </summary>
    public static void AssertExpertsKeptWherePossible(TrainingPlan previous, TrainingPlan next)
    {
        int w = next.WorldSize;
        for (int l = 0; l < next.ExpertOwner.Length; l++)
        {
            int experts = next.ExpertOwner[l].Length;
            int kept = 0;
            int best = 0;
            int canTakeExtra = 0;
            int floor = experts / w, extra = experts % w;
            foreach (var slot in next.Workers)
            {
                var before = Enumerable.Range(0, experts).Where(e => OwnerId(previous, l, e) == slot.Id).ToHashSet();
                var after = Enumerable.Range(0, experts).Where(e => OwnerId(next, l, e) == slot.Id).ToHashSet();
                int keptHere = before.Intersect(after).Count();
                Assert.True(keptHere == Math.Min(before.Count, after.Count),
                    $"layer {l}: {slot.Id} held {before.Count}, holds {after.Count}, but kept only {keptHere}");
                kept += keptHere;
                best += Math.Min(before.Count, floor);
                if (before.Count > floor) canTakeExtra++;
            }
            best += Math.Min(extra, canTakeExtra);
            Assert.True(kept == best, $"layer {l}: kept {kept} experts in place, a balanced layout could keep {best}");
        }
    }
}
