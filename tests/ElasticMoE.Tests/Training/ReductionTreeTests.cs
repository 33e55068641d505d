using ElasticMoE.Training;
using static TorchSharp.torch;

namespace ElasticMoE.Tests.Training;

/// <summary>The canonical reduction order: a fixed tree over micro-batches, whoever holds which of them.</summary>
public class ReductionTreeTests
{
    // A non-associative "addition" that spells out its grouping: equal strings, equal float sums.
    private static string? Spell(string? l, string? r) => $"({l}+{r})";

    private static string? Whole(int leaves)
    {
        var acc = new TreeAccumulator<string>(leaves, 0, leaves, Spell);
        for (int m = 0; m < leaves; m++) acc.Add(m, m.ToString());
        return acc.Root;
    }

    [Theory]
    [InlineData(1), InlineData(2), InlineData(3), InlineData(5), InlineData(12), InlineData(16), InlineData(17)]
    public void Cover_is_the_maximal_nodes_inside_a_range_and_partitions_it(int leaves)
    {
        for (int lo = 0; lo <= leaves; lo++)
            for (int hi = lo; hi <= leaves; hi++)
            {
                var nodes = ReductionTree.Cover(lo, hi, leaves);
                int next = lo;
                foreach (var node in nodes)
                {
                    var (s, e) = ReductionTree.Range(node, leaves);
                    Assert.Equal(next, s);
                    Assert.True(e > s);
                    next = e;
                    // Maximal: the parent reaches outside the range (or it is the root).
                    if (node.Level < ReductionTree.Height(leaves))
                    {
                        var (ps, pe) = ReductionTree.Range(new TreeNode(node.Level + 1, node.Index >> 1), leaves);
                        Assert.True(ps < lo || pe > hi || (ps, pe) == (s, e), $"{node} of [{lo},{hi}) is not maximal");
                    }
                }
                Assert.Equal(hi, next);
                // Never more than two nodes a level.
                Assert.True(nodes.Count <= 2 * (ReductionTree.Height(leaves) + 1));
            }
    }

    [Fact]
    public void The_tree_groups_twelve_micro_batches_in_one_fixed_way()
    {
        Assert.Equal("((((0+1)+(2+3))+((4+5)+(6+7)))+((8+9)+(10+11)))", Whole(12));
        Assert.Equal("((0+1)+2)", Whole(3));
        Assert.Equal("0", Whole(1));
    }

    [Theory]
    [InlineData(12, 1), InlineData(12, 2), InlineData(12, 3), InlineData(12, 4), InlineData(12, 5), InlineData(12, 12),
     InlineData(2, 3), InlineData(7, 4), InlineData(16, 6)]
    public void Any_split_into_contiguous_shares_combines_to_the_whole_steps_grouping(int leaves, int workers)
    {
        var partials = new Dictionary<TreeNode, string?>();
        for (int w = 0; w < workers; w++)
        {
            var share = ElasticMoE.Data.BatchAssignment.MicroBatchesFor(w, workers, leaves);
            if (share.Length == 0) continue;
            var acc = new TreeAccumulator<string>(leaves, share[0], share[^1] + 1, Spell);
            // Stages run their backwards last to first: arrival order must not matter.
            foreach (int m in w % 2 == 0 ? share : share.Reverse()) acc.Add(m, m.ToString());
            Assert.Equal(ReductionTree.Cover(share[0], share[^1] + 1, leaves), acc.Partials.Select(p => p.Node));
            foreach (var (node, value) in acc.Partials) partials.Add(node, value);
        }
        Assert.Equal(Whole(leaves), ReductionTree.CombineRoot(leaves, partials, Spell));
    }

    [Fact]
    public void Absent_values_are_skipped_not_added_and_all_absent_stays_absent()
    {
        var acc = new TreeAccumulator<string>(4, 0, 4, Spell);
        acc.Add(0, null);
        acc.Add(1, "1");
        acc.Add(2, null);
        acc.Add(3, null);
        Assert.Equal("1", acc.Root);
        var none = new TreeAccumulator<string>(3, 0, 3, Spell);
        for (int m = 0; m < 3; m++) none.Add(m, null);
        Assert.Null(none.Root);
    }

    [Fact]
    public void Bad_use_is_refused()
    {
        var acc = new TreeAccumulator<string>(4, 1, 3, Spell);
        Assert.Throws<ArgumentOutOfRangeException>(() => acc.Add(3, "3"));
        acc.Add(1, "1");
        Assert.Throws<InvalidOperationException>(() => acc.Add(1, "1"));
        Assert.Throws<InvalidOperationException>(() => acc.Partials);
        acc.Add(2, "2");
        Assert.Throws<InvalidOperationException>(() => acc.Root);   // not the whole step
        Assert.Throws<InvalidOperationException>(() => ReductionTree.CombineRoot(4, acc.Partials.ToDictionary(p => p.Node, p => p.Value), Spell));
        Assert.Throws<ArgumentOutOfRangeException>(() => ReductionTree.Cover(2, 5, 4));
    }

    [Fact]
    public void Float_sums_over_shares_are_bit_identical_to_the_whole_step_though_a_left_fold_is_not()
    {
        var rng = new Random(5);
        const int leaves = 12, n = 4096;
        var values = Enumerable.Range(0, leaves).Select(_ => Enumerable.Range(0, n).Select(_ => (float)((rng.NextDouble() - 0.5) * Math.Pow(10, rng.Next(-3, 3)))).ToArray()).ToArray();
        float[]? Add(float[]? l, float[]? r) { for (int i = 0; i < n; i++) l![i] += r![i]; return l; }
        float[] Run(int workers)
        {
            var partials = new Dictionary<TreeNode, float[]?>();
            for (int w = 0; w < workers; w++)
            {
                var share = ElasticMoE.Data.BatchAssignment.MicroBatchesFor(w, workers, leaves);
                var acc = new TreeAccumulator<float[]>(leaves, share[0], share[^1] + 1, Add);
                foreach (int m in share) acc.Add(m, (float[])values[m].Clone());
                foreach (var (node, v) in acc.Partials) partials.Add(node, v);
            }
            return ReductionTree.CombineRoot(leaves, partials, Add)!;
        }
        var whole = Run(1);
        foreach (int workers in new[] { 2, 3, 4, 5, 6 })
            Assert.Equal(whole.Select(BitConverter.SingleToInt32Bits), Run(workers).Select(BitConverter.SingleToInt32Bits));
        // Sanity: the grouping matters for these values, so the test could fail.
        var fold = new float[n];
        foreach (var v in values) for (int i = 0; i < n; i++) fold[i] += v[i];
        Assert.NotEqual(whole.Select(BitConverter.SingleToInt32Bits), fold.Select(BitConverter.SingleToInt32Bits));
    }

    [Fact]
    public void Losses_are_added_in_micro_batch_order_and_every_one_must_come_once()
    {
        double[] l = [0.1, 1e17, -1e17, 0.3];
        Assert.Equal(((0.1 + 1e17) + -1e17) + 0.3, MicroBatchLosses.Sum([(2, [l[2], l[3]]), (0, [l[0], l[1]])], 4));
        Assert.Throws<InvalidOperationException>(() => MicroBatchLosses.Sum([(0, [1.0, 2.0])], 3));
        Assert.Throws<InvalidOperationException>(() => MicroBatchLosses.Sum([(0, [1.0, 2.0]), (1, [2.0])], 2));
        Assert.Throws<InvalidOperationException>(() => MicroBatchLosses.Sum([(1, [1.0, 2.0])], 2));
    }

    [Fact]
    public void The_norm_is_added_in_name_order_and_a_name_counted_twice_is_refused()
    {
        var a = new Dictionary<string, double> { ["b"] = 1e17, ["a"] = 0.5 };
        var b = new Dictionary<string, double> { ["c"] = -1e17 };
        Assert.Equal((0.5 + 1e17) + -1e17, GradClip.CanonicalTotal(b.Concat(a)));
        Assert.Equal(GradClip.CanonicalTotal(a.Concat(b)), GradClip.CanonicalTotal(b.Concat(a)));
        Assert.Throws<InvalidOperationException>(() => GradClip.CanonicalTotal(a.Concat(a)));
    }

    [Fact]
    public void A_gradient_tree_takes_each_micro_batch_and_installs_the_canonical_sum()
    {
        TestSupport.EnsureTorch();
        using var w = zeros(3, requires_grad: true);
        using var unused = zeros(2, requires_grad: true);
        float[][] grads = [[1e8f, 1, 0], [-1e8f, 2, 0], [1, 3, 0]];
        using (var tree = new GradientTree([w, unused], 3, 0, 3))
        {
            for (int m = 0; m < 3; m++)
            {
                using var g = tensor(grads[m]);
                (w * g).sum().backward();
                tree.Take(m);
                Assert.Null(w.grad);
            }
            tree.InstallRoot();
        }
        // ((g0 + g1) + g2): 1e8 - 1e8 + 1 = 1, where a left fold in another grouping would lose the 1.
        Assert.Equal(new[] { 1f, 6f, 0f }, w.grad!.data<float>().ToArray());
        Assert.Null(unused.grad);
    }
}
