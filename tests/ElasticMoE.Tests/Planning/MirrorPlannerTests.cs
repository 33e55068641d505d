using ElasticMoE.Configuration;
using ElasticMoE.Planning;
using ElasticMoE.State;
using static ElasticMoE.Tests.Planning.PlanningKit;

namespace ElasticMoE.Tests.Planning;

/// <summary>
/// r mirrors across nodes and failure domains (<see cref="MirrorPlanner"/>), as the pure planners see them:
/// where the copies of every unit are, that any r nodes (or a whole domain) can vanish without a loss, that the
/// next plan re-establishes the redundancy, and that mirrors stay where they are when still valid.
/// </summary>
public class MirrorPlannerTests
{
    /// <summary>Every unit with the ranks that hold a current copy of it under <paramref name="plan"/>: holders and mirror keepers.</summary>
    private static Dictionary<UnitId, HashSet<int>> Copies(TrainingPlan plan, ModelOptions model)
    {
        var result = plan.Holders(model).ToDictionary(kv => kv.Key, kv => kv.Value.ToHashSet());
        for (int r = 0; r < plan.WorldSize; r++)
            foreach (var (unit, _) in plan.MirrorsHeldBy(r, model)) result[unit].Add(r);
        return result;
    }

    private static List<WorkerSlot> InDomains(params (string Node, string Domain)[] nodes) => nodes.Select(n => Slot(n.Node)).ToList();

    private static Dictionary<string, string> DomainMap(params (string Node, string Domain)[] nodes) => nodes.ToDictionary(n => n.Node, n => n.Domain);

    private static IEnumerable<int[]> Subsets(int n, int k)
    {
        if (k == 0) { yield return []; yield break; }
        for (int first = 0; first < n; first++)
            foreach (var rest in Subsets(n - first - 1, k - 1))
                yield return [first, .. rest.Select(x => x + first + 1)];
    }

    private static int PpFor(int workers, int pp) => Enumerable.Range(1, Math.Min(pp, workers)).Reverse().First(p => workers % p == 0);

    [Theory]
    [InlineData(0, 4, 1)]
    [InlineData(1, 4, 1)]
    [InlineData(1, 4, 2)]
    [InlineData(2, 5, 1)]
    [InlineData(2, 4, 2)]
    [InlineData(2, 6, 3)]
    [InlineData(3, 5, 1)]
    [InlineData(3, 4, 4)]
    public void Every_unit_has_copies_on_r_plus_one_distinct_nodes(int r, int nodes, int pp)
    {
        var model = SmallModel();
        var plan = ElasticPlanner.Next(null, Workers(nodes), nodes, pp, model, 1, redundancy: r);
        Assert.False(plan.BelowRedundancy);
        Assert.Equal(r, plan.EffectiveRedundancy);
        for (int rank = 0; rank < nodes; rank++)
        {
            var keepers = plan.MirrorKeepersOf(rank);
            Assert.Equal(r, keepers.Length);
            Assert.Equal(r + 1, keepers.Select(k => plan.Workers[k].NodeAddress).Append(plan.Workers[rank].NodeAddress).Distinct().Count());
        }
        foreach (var (unit, ranks) in Copies(plan, model))
            Assert.True(ranks.Select(x => plan.Workers[x].NodeAddress).Distinct().Count() >= r + 1, $"{unit} has copies on {string.Join(",", ranks)} only");
        // No mirror at all without redundancy; no mirror of a unit already on r + 1 nodes.
        if (r == 0) Assert.All(Enumerable.Range(0, nodes), x => Assert.Empty(plan.MirrorsHeldBy(x, model)));
    }

    [Fact]
    public void One_mirror_without_domains_is_the_next_rank_on_another_node_as_before()
    {
        var model = SmallModel();
        var slots = new[] { Slot("a", 0), Slot("a", 1), Slot("b", 0), Slot("c", 0) };
        var plan = ElasticPlanner.Next(null, slots, 4, 1, model, 1, redundancy: 1);
        for (int rank = 0; rank < 4; rank++)
        {
            int expected = Enumerable.Range(1, 3).Select(i => (rank + i) % 4).First(x => plan.Workers[x].NodeAddress != plan.Workers[rank].NodeAddress);
            Assert.Equal([expected], plan.MirrorKeepersOf(rank));
        }
        Assert.Null(plan.Domains);
    }

    [Theory]
    [InlineData(1, 4)]
    [InlineData(2, 5)]
    [InlineData(3, 5)]
    [InlineData(2, 6)]
    public void Any_r_nodes_lost_at_once_lose_nothing_and_the_next_plan_is_redundant_again(int r, int nodes)
    {
        var model = SmallModel();
        foreach (int pp in new[] { 1, nodes % 2 == 0 ? 2 : 1 }.Distinct())
        {
            var plan = ElasticPlanner.Next(null, Workers(nodes), nodes, pp, model, 1, redundancy: r);
            int tried = 0;
            foreach (var victims in Subsets(nodes, r))
            {
                var gone = victims.Select(v => plan.Workers[v].Id).ToList();
                var survivors = plan.Workers.Where(w => !gone.Contains(w.Id)).ToList();
                int left = survivors.Count;
                var next = ElasticPlanner.Next(plan, survivors, left, PpFor(left, pp), model, 2, redundancy: r);
                AssertValid(next, model);
                var transfer = TransferPlanner.Between(plan, next, model, gone);   // throws UnitsLostException on a loss
                Assert.All(transfer.Moves, m => Assert.DoesNotContain(m.From, gone));
                // Redundancy back as far as the nodes left allow.
                Assert.Equal(Math.Min(r, left - 1), next.EffectiveRedundancy);
                foreach (var (unit, ranks) in Copies(next, model))
                    Assert.True(ranks.Select(x => next.Workers[x].NodeAddress).Distinct().Count() >= Math.Min(r + 1, left), $"{unit} after losing {string.Join(",", victims)}");
                tried++;
            }
            Assert.True(tried >= nodes, $"only {tried} subsets tried");
        }
    }

    [Fact]
    public void One_more_node_lost_than_the_redundancy_can_lose_units()
    {
        var model = SmallModel();
        var plan = ElasticPlanner.Next(null, Workers(5), 5, 1, model, 1, redundancy: 2);
        // Each rank's units live on the rank and its two keepers: losing all three loses them.
        var victims = new[] { 0 }.Concat(plan.MirrorKeepersOf(0)).Select(v => plan.Workers[v].Id).ToList();
        var survivors = plan.Workers.Where(w => !victims.Contains(w.Id)).ToList();
        var next = ElasticPlanner.Next(plan, survivors, 2, 1, model, 2, redundancy: 2);
        var ex = Assert.Throws<UnitsLostException>(() => TransferPlanner.Between(plan, next, model, victims));
        Assert.All(ex.Units, u => Assert.Contains(u, plan.UnitsOf(0, model)));
    }

    [Theory]
    [InlineData(1, 2)]
    [InlineData(2, 3)]
    [InlineData(3, 1)]
    public void Fewer_nodes_than_r_plus_one_place_what_they_can_and_say_so(int r, int nodes)
    {
        var model = SmallModel();
        var plan = ElasticPlanner.Next(null, Workers(nodes), nodes, 1, model, 1, redundancy: r);
        bool below = nodes < r + 1;
        Assert.Equal(below, plan.BelowRedundancy);
        Assert.Equal(Math.Min(r, nodes - 1), plan.EffectiveRedundancy);
        for (int rank = 0; rank < nodes; rank++) Assert.Equal(Math.Min(r, nodes - 1), plan.MirrorKeepersOf(rank).Length);
        // Every unit is on every node when there are not enough of them.
        foreach (var (unit, ranks) in Copies(plan, model))
            Assert.Equal(Math.Min(r + 1, nodes), ranks.Select(x => plan.Workers[x].NodeAddress).Distinct().Count());
    }

    [Fact]
    public void Two_domains_of_two_nodes_and_one_mirror_survive_the_loss_of_either_domain()
    {
        var model = SmallModel();
        // Domains interleaved against rank order, so that the plain next-rank keeper would share the domain.
        var nodes = new[] { ("n0", "rack-a"), ("n1", "rack-a"), ("n2", "rack-b"), ("n3", "rack-b") };
        foreach (int pp in new[] { 1, 2 })
        {
            var plan = ElasticPlanner.Next(null, InDomains(nodes), 4, pp, model, 1, redundancy: 1, domains: DomainMap(nodes));
            Assert.NotNull(plan.Domains);
            Assert.Equal(2, plan.DomainCount);
            foreach (var (unit, ranks) in Copies(plan, model))
                Assert.Equal(2, ranks.Select(plan.DomainOf).Distinct().Count());
            foreach (var domain in new[] { "rack-a", "rack-b" })
            {
                var gone = plan.Workers.Where((w, i) => plan.DomainOf(i) == domain).Select(w => w.Id).ToList();
                var survivors = plan.Workers.Where(w => !gone.Contains(w.Id)).ToList();
                var next = ElasticPlanner.Next(plan, survivors, 2, PpFor(2, pp), model, 2, redundancy: 1, domains: DomainMap(nodes));
                TransferPlanner.Between(plan, next, model, gone);   // no UnitsLostException
                Assert.Equal(1, next.DomainCount);
            }
        }
    }

    [Fact]
    public void Three_domains_and_two_mirrors_put_every_copy_in_its_own_domain()
    {
        var model = SmallModel();
        var nodes = new[] { ("n0", "z1"), ("n1", "z1"), ("n2", "z2"), ("n3", "z2"), ("n4", "z3"), ("n5", "z3") };
        var plan = ElasticPlanner.Next(null, InDomains(nodes), 6, 2, model, 1, redundancy: 2, domains: DomainMap(nodes));
        foreach (var (unit, ranks) in Copies(plan, model))
            Assert.Equal(3, ranks.Select(plan.DomainOf).Distinct().Count());
        for (int rank = 0; rank < 6; rank++)
            Assert.Equal(3, plan.MirrorKeepersOf(rank).Select(plan.DomainOf).Append(plan.DomainOf(rank)).Distinct().Count());
    }

    [Fact]
    public void Too_few_domains_spread_the_copies_as_evenly_as_they_can()
    {
        var model = SmallModel();
        // Three copies (r = 2) over two domains: two in one, one in the other, never three in one.
        var nodes = new[] { ("n0", "a"), ("n1", "a"), ("n2", "a"), ("n3", "b"), ("n4", "b") };
        var plan = ElasticPlanner.Next(null, InDomains(nodes), 5, 1, model, 1, redundancy: 2, domains: DomainMap(nodes));
        for (int rank = 0; rank < 5; rank++)
        {
            var copies = plan.MirrorKeepersOf(rank).Append(rank).ToList();
            Assert.Equal(3, copies.Select(x => plan.Workers[x].NodeAddress).Distinct().Count());
            Assert.Equal(2, copies.Select(plan.DomainOf).Distinct().Count());
        }
        // A whole domain lost with r = 2: still nothing lost, since the other domain holds a copy of everything.
        foreach (var domain in new[] { "a", "b" })
        {
            var gone = plan.Workers.Where((w, i) => plan.DomainOf(i) == domain).Select(w => w.Id).ToList();
            var survivors = plan.Workers.Where(w => !gone.Contains(w.Id)).ToList();
            var next = ElasticPlanner.Next(plan, survivors, survivors.Count, 1, model, 2, redundancy: 2, domains: DomainMap(nodes));
            TransferPlanner.Between(plan, next, model, gone);
        }
    }

    [Fact]
    public void Dense_copies_of_data_parallel_replicas_in_one_domain_are_still_mirrored_into_another()
    {
        var model = SmallModel();
        // DP 2 x PP 2: stage 0 on ranks 0 and 2. Both in domain "a": their dense units need a copy in "b".
        var nodes = new[] { ("n0", "a"), ("n1", "b"), ("n2", "a"), ("n3", "b") };
        var plan = ElasticPlanner.Next(null, InDomains(nodes), 4, 2, model, 1, redundancy: 1, domains: DomainMap(nodes));
        Assert.Equal("a", plan.DomainOf(0));
        Assert.Equal("a", plan.DomainOf(2));
        var stage0 = UnitCatalog.StageUnits(model, plan.Stages[0].First, plan.Stages[0].End).ToList();
        var copies = Copies(plan, model);
        Assert.All(stage0, u => Assert.Contains("b", copies[u].Select(plan.DomainOf)));
    }

    [Fact]
    public void Mirrors_stay_where_they_are_when_a_node_leaves_or_joins()
    {
        var model = SmallModel();
        var plan = ElasticPlanner.Next(null, Workers(5), 5, 1, model, 1, redundancy: 2);
        // node2 leaves: every worker whose keepers are both still there keeps them; the others keep the one left.
        var gone = plan.Workers[2].Id;
        var survivors = plan.Workers.Where(w => w.Id != gone).ToList();
        var next = ElasticPlanner.Next(plan, survivors, 4, 1, model, 2, redundancy: 2);
        var before = KeepersById(plan);
        var after = KeepersById(next);
        foreach (var (id, keepers) in after)
        {
            var valid = before[id].Where(k => k != gone).ToList();
            Assert.Equal(valid, keepers.Take(valid.Count));
        }
        // A newcomer takes no mirror away from a worker that has its r keepers.
        var grown = ElasticPlanner.Next(next, [.. survivors, Slot("node9")], 5, 1, model, 3, redundancy: 2);
        foreach (var (id, keepers) in KeepersById(grown))
            if (after.TryGetValue(id, out var old)) Assert.Equal(old, keepers);
        // Unchanged workers, unchanged plan: the same keepers, so a re-plan moves no mirror.
        var same = ElasticPlanner.Next(grown, grown.Workers, 5, 1, model, 4, redundancy: 2);
        Assert.True(same.SameLayout(grown));
        Assert.Empty(TransferPlanner.Between(grown, same, model).Moves);
    }

    private static Dictionary<WorkerId, List<WorkerId>> KeepersById(TrainingPlan plan)
        => Enumerable.Range(0, plan.WorldSize).ToDictionary(r => plan.Workers[r].Id, r => plan.MirrorKeepersOf(r).Select(k => plan.Workers[k].Id).ToList());

    [Fact]
    public void Placement_is_deterministic_whatever_order_the_workers_come_in()
    {
        var model = SmallModel();
        var nodes = new[] { ("n0", "a"), ("n1", "b"), ("n2", "a"), ("n3", "c"), ("n4", "b"), ("n5", "c") };
        var reference = ElasticPlanner.Next(null, InDomains(nodes), 6, 1, model, 1, redundancy: 2, domains: DomainMap(nodes));
        for (int seed = 0; seed < 5; seed++)
        {
            var plan = ElasticPlanner.Next(null, Shuffled(InDomains(nodes), seed), 6, 1, model, 1, redundancy: 2, domains: DomainMap(nodes));
            Assert.Equal(reference.Keepers, plan.Keepers);
            Assert.Equal(reference.Domains, plan.Domains);
            Assert.True(plan.SameLayout(reference));
        }
    }
}
