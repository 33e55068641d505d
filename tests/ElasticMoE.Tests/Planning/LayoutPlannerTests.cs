using ElasticMoE.Runtime.Protocol;
using ElasticMoE.Planning;
using ElasticMoE.Runtime.Engine;

namespace ElasticMoE.Tests.Planning;

public class LayoutPlannerTests
{
    private static List<WorkerSlot> Workers(int n) => Enumerable.Range(0, n).Select(i => new WorkerSlot(new WorkerId($"node{i}", 1, 0), $"127.0.0.1:{9000 + i}")).ToList();

    [Theory]
    [InlineData(4, 1)]
    [InlineData(4, 2)]
    [InlineData(5, 2)]
    [InlineData(7, 3)]
    [InlineData(3, 3)]
    public void Layers_split_into_contiguous_stages_differing_by_at_most_one(int layers, int stages)
    {
        var split = LayoutPlanner.SplitLayers(layers, stages);
        Assert.Equal(stages, split.Length);
        Assert.Equal(0, split[0].First);
        Assert.Equal(layers, split[^1].End);
        for (int i = 1; i < split.Length; i++) Assert.Equal(split[i - 1].End, split[i].First);
        var sizes = split.Select(s => s.End - s.First).ToList();
        Assert.True(sizes.Min() >= 1 && sizes.Max() - sizes.Min() <= 1);
    }

    [Theory]
    [InlineData(8, 3)]
    [InlineData(6, 4)]
    [InlineData(4, 1)]
    public void Experts_spread_evenly_and_rotate_by_layer(int experts, int workers)
    {
        var owner = LayoutPlanner.RoundRobin(3, experts, workers);
        foreach (var layer in owner)
        {
            var perWorker = Enumerable.Range(0, workers).Select(w => layer.Count(o => o == w)).ToList();
            Assert.True(perWorker.Max() - perWorker.Min() <= 1);
        }
        if (workers > 1 && experts % workers != 0)
            Assert.NotEqual(owner[0], owner[1]);   // the extra experts do not always land on worker 0
    }

    [Fact]
    public void A_plan_maps_workers_to_replicas_and_stages()
    {
        var cfg = TestSupport.SmallConfig(("model.layers", "4"));
        var plan = LayoutPlanner.Plan(3, Workers(6), 2, cfg.Model);
        Assert.Equal((3, 2), (plan.Dp, plan.Pp));
        Assert.Equal(new[] { 0, 2, 4 }, plan.StageGroup(0));
        Assert.Equal(new[] { 1, 3, 5 }, plan.StageGroup(1));
        Assert.Equal(5, plan.WorkerAt(2, 1));
        Assert.Equal((2, 1), (plan.ReplicaOf(5), plan.StageOf(5)));
        Assert.Equal(1, plan.StageOfBlock(3));
        Assert.Equal(3, plan.Epoch);
        // Every expert of every MoE layer has exactly one owner among the workers.
        Assert.Equal(cfg.Model.Layers - cfg.Model.DenseLayers, plan.ExpertOwner.Length);
        for (int l = 0; l < plan.ExpertOwner.Length; l++)
            Assert.Equal(Enumerable.Range(0, cfg.Model.MoE.RoutedExperts), Enumerable.Range(0, 6).SelectMany(w => plan.ExpertsOn(l, w)).Order());
    }

    [Fact]
    public void Experts_are_private_only_without_data_parallel_replicas()
    {
        var cfg = TestSupport.SmallConfig(("model.layers", "4"));
        var pipeline = LayoutPlanner.Plan(1, Workers(2), 2, cfg.Model);
        Assert.True(pipeline.ExpertsPrivateTo(0, 0, 1));     // block 1 sits on stage 0 = worker 0
        Assert.False(pipeline.ExpertsPrivateTo(0, 1, 1));    // worker 1 does not run block 1
        Assert.True(pipeline.ShardIsPrivate(0, 0, denseLayers: 1));    // MoE layer 0 = block 1
        Assert.False(pipeline.ShardIsPrivate(0, 1, denseLayers: 1));
        var dataParallel = LayoutPlanner.Plan(1, Workers(2), 1, cfg.Model);
        Assert.False(dataParallel.ExpertsPrivateTo(0, 0, 1)); // the other replica sends tokens too
    }

    [Fact]
    public void Impossible_layouts_are_refused_with_the_reason()
    {
        var cfg = TestSupport.SmallConfig(("model.layers", "3"));
        Assert.Contains("must divide", Assert.Throws<ArgumentException>(() => LayoutPlanner.Plan(1, Workers(3), 2, cfg.Model)).Message);
        Assert.Contains("exceeds", Assert.Throws<ArgumentException>(() => LayoutPlanner.Plan(1, Workers(4), 4, cfg.Model)).Message);
        Assert.Throws<ArgumentException>(() => LayoutPlanner.Plan(1, Workers(0), 1, cfg.Model));
    }

    [Fact]
    public void Step_tags_differ_in_every_field_and_stay_below_the_collective_range()
    {
        var tags = new HashSet<Int128>();
        foreach (var kind in Enum.GetValues<StepTags.Kind>().Where(k => k != StepTags.Kind.Unit))
            for (int epoch = 0; epoch < 2; epoch++)
                for (long step = 0; step < 3; step++)
                    for (int attempt = 0; attempt < 2; attempt++)
                        foreach (int layer in new[] { 0, 1, 255, 256, 1023 })
                            foreach (int m in new[] { 0, 1, 255, 256, 4095 })
                                foreach (int a in new[] { 0, 1, 127, 128, 4095 })
                                    foreach (int b in new[] { 0, 128, 4095 })
                                    {
                                        Int128 t = StepTags.Make(kind, new Fence(epoch, step, attempt), layer, m, a, b);
                                        Assert.True(t >= 0 && !ElasticMoE.Runtime.DataPlane.CollectiveTags.IsCollective(t));
                                        Assert.True(tags.Add(t), $"tag collision at {kind} e{epoch} s{step} a{attempt} l{layer} m{m} {a}->{b}");
                                    }
        Assert.Throws<ArgumentOutOfRangeException>(() => StepTags.Make(StepTags.Kind.Activation, default, 0, 0, 4096));
        Assert.Throws<ArgumentOutOfRangeException>(() => StepTags.Make(StepTags.Kind.Activation, default, 0, 0, 0, 4096));
        Assert.Throws<ArgumentOutOfRangeException>(() => StepTags.Make(StepTags.Kind.Activation, default, 0, 4096, 0));
        Assert.Throws<ArgumentOutOfRangeException>(() => StepTags.Make(StepTags.Kind.Activation, default, 1024, 0, 0));
        Assert.Throws<ArgumentOutOfRangeException>(() => StepTags.UnitTransfer(0, 0, 4096));
        Assert.NotEqual(StepTags.UnitTransfer(0, 1, 4095), StepTags.UnitTransfer(0, 2, 0));
    }

    [Fact]
    public void Frames_of_older_attempts_are_stale_and_later_ones_never_are()
    {
        var now = new Fence(3, 70000, 2);   // the step wraps in the tag (16 bits): compared by signed distance
        Int128 Tag(Fence f) => StepTags.Make(StepTags.Kind.ExpertTokens, f, 1000, 4000, 3000, 4095);
        Int128 Coll(Fence f) => ElasticMoE.Runtime.DataPlane.CollectiveTags.Compose(
            ElasticMoE.Runtime.DataPlane.CollectiveTags.CollectiveId(f.Epoch, f.Step, 1023, f.Attempt & 0xF), 5);
        foreach (var older in new[] { now with { Attempt = 1 }, now with { Attempt = 0 }, now with { Step = now.Step - 1, Attempt = 7 }, now with { Epoch = 2, Step = now.Step + 5 } })
        {
            Assert.True(StepTags.IsStale(Tag(older), now), $"{older} should be stale under {now}");
            Assert.True(StepTags.IsStale(Coll(older), now), $"collective {older} should be stale under {now}");
        }
        foreach (var later in new[] { now, now with { Attempt = 3 }, now with { Step = now.Step + 1, Attempt = 0 }, now with { Epoch = 4, Step = 0, Attempt = 0 } })
        {
            Assert.False(StepTags.IsStale(Tag(later), now), $"{later} must not be stale under {now}");
            Assert.False(StepTags.IsStale(Coll(later), now), $"collective {later} must not be stale under {now}");
        }
        Assert.False(StepTags.IsStale(StepTags.UnitTransfer(1, 12, 3), now), "unit transfers are not step traffic");
    }
}
