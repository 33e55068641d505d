using ElasticMoE.Configuration;
using ElasticMoE.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace ElasticMoE.Tests.Model;

public class MoELayerTests
{
    private static MoELayer Layer(RouterScoring scoring = RouterScoring.Sigmoid, double alpha = 0, double capacity = 0)
    {
        TestSupport.EnsureTorch();
        torch.manual_seed(11);
        var o = new MoEOptions(SharedExperts: 1, RoutedExperts: 4, TopK: 2, ExpertHidden: 6, Scoring: scoring, RouteScale: 1.0,
                               BiasUpdateRate: 0.001, SequenceAuxAlpha: alpha, CapacityFactor: capacity);
        var layer = new MoELayer(1, 8, o);
        layer.to(ScalarType.Float64);
        return layer;
    }

    [Theory]
    [InlineData(RouterScoring.Sigmoid)]
    [InlineData(RouterScoring.Softmax)]
    public void Gradients_match_finite_differences_in_float64(RouterScoring scoring)
    {
        using var layer = Layer(scoring);
        using var gen = new Generator(3);
        var x = randn(new long[] { 2, 5, 8 }, ScalarType.Float64, generator: gen).requires_grad_(true);
        var w = randn(new long[] { 2, 5, 8 }, ScalarType.Float64, generator: gen);
        double Loss() { using var _ = no_grad(); return (layer.forward(x) * w).sum().item<double>(); }

        layer.zero_grad();
        (layer.forward(x) * w).sum().backward();

        var checks = new List<(string Name, Tensor P)> { ("input", x) };
        checks.AddRange(layer.named_parameters().Select(p => (p.name, (Tensor)p.parameter)));
        int checkedEntries = GradientCheck.AssertMatches(Loss, checks, new Random(5), perTensor: 6, absolute: 1e-6, relative: 1e-5);
        Assert.True(checkedEntries >= 6 * 9);
        // The router learns through the gates: its weight must get a real gradient.
        Assert.True(layer.Router.Gate.weight!.grad!.abs().sum().item<double>() > 0);
    }

    [Theory]
    [InlineData("Chunked")]
    [InlineData("Grouped")]
    [InlineData("Loop")]
    public void Dispatch_expert_combine_path_equals_the_dense_fused_path(string kernel)
    {
        using var layer = Layer();
        layer.Kernel = Enum.Parse<ExpertKernel>(kernel);
        using var gen = new Generator(4);
        var x1 = randn(new long[] { 3, 7, 8 }, ScalarType.Float64, generator: gen).requires_grad_(true);
        var x2 = x1.detach().clone().requires_grad_(true);
        var w = randn(new long[] { 3, 7, 8 }, ScalarType.Float64, generator: gen);

        layer.zero_grad();
        var ySplit = layer.forward(x1);
        (ySplit * w).sum().backward();
        var splitGrads = layer.parameters().Select(p => p.grad!.clone()).ToList();

        layer.zero_grad();
        var yDense = layer.ForwardDense(x2);
        (yDense * w).sum().backward();
        var denseGrads = layer.parameters().Select(p => p.grad!.clone()).ToList();

        Assert.True(allclose(ySplit, yDense, rtol: 1e-12, atol: 1e-12));
        Assert.True(allclose(x1.grad!, x2.grad!, rtol: 1e-12, atol: 1e-12));
        for (int i = 0; i < splitGrads.Count; i++)
            Assert.True(allclose(splitGrads[i], denseGrads[i], rtol: 1e-10, atol: 1e-12), $"parameter {i} gradient differs");
    }

    [Fact]
    public void Every_token_reaches_top_k_experts_and_counts_are_exposed()
    {
        using var layer = Layer();
        using var x = randn(new long[] { 2, 5, 8 }, ScalarType.Float64);
        layer.forward(x).Dispose();
        var counts = layer.TakeStepCounts();
        Assert.Equal(2 * 5 * 2, counts.Sum());           // no drop by default: N * k assignments
        Assert.Equal(0, layer.TakeStepCounts().Sum());  // taking resets
    }

    [Fact]
    public void Capacity_factor_caps_tokens_per_expert()
    {
        using var layer = Layer(capacity: 0.5);
        using var x = randn(new long[] { 4, 8, 8 }, ScalarType.Float64);
        long cap = layer.Capacity(32)!.Value;               // ceil(0.5 * 32 * 2 / 4) = 8
        Assert.Equal(8, cap);
        var routing = layer.Router.forward(x.reshape(32, 8));
        using var plan = DispatchPlan.Create(routing.Indices, 4, cap);
        Assert.All(plan.Counts, c => Assert.True(c <= cap));
        Assert.Equal(64, plan.Counts.Sum() + plan.Dropped);
        layer.forward(x).Dispose();
        Assert.True(layer.TakeStepCounts().All(c => c <= cap));
    }

    [Fact]
    public void Sequence_balance_loss_is_positive_and_reaches_the_router()
    {
        using var layer = Layer(alpha: 0.01);
        var x = randn(new long[] { 2, 6, 8 }, ScalarType.Float64);
        layer.zero_grad();
        layer.forward(x).Dispose();
        var aux = layer.LastAuxLoss!;
        Assert.True(aux.item<double>() > 0);
        aux.backward();
        Assert.True(layer.Router.Gate.weight!.grad!.abs().sum().item<double>() > 0);
    }

    [Fact]
    public void Running_no_expert_gives_zeros_shaped_like_the_rows_that_still_carry_gradient()
    {
        using var layer = Layer();
        // A shard sent no tokens: zero rows, all counts zero. Its output must still backpropagate.
        using var empty = zeros(new long[] { 0, 8 }, ScalarType.Float64).requires_grad_(true);
        using var none = layer.RunExperts([0, 1], empty, [0L, 0L]);
        Assert.Equal(new long[] { 0, 8 }, none.shape);
        Assert.Equal(ScalarType.Float64, none.dtype);
        Assert.True(none.requires_grad);
        using var grad = zeros(new long[] { 0, 8 }, ScalarType.Float64);
        none.backward([grad]);
        Assert.Equal(new long[] { 0, 8 }, empty.grad!.shape);

        // Rows but no expert to run them (as before: the rows times zero).
        using var rows = randn(new long[] { 3, 8 }, ScalarType.Float64);
        using var zero = layer.RunExperts([], rows, []);
        Assert.Equal(new long[] { 3, 8 }, zero.shape);
        Assert.Equal(ScalarType.Float64, zero.dtype);
        using var nonZero = zero.count_nonzero();
        Assert.Equal(0L, nonZero.item<long>());
    }

    // Float32 layer of the default shape class (8 routed experts), for grouped-vs-loop comparisons.
    private static MoELayer Fp32Layer()
    {
        TestSupport.EnsureTorch();
        torch.manual_seed(21);
        var o = new MoEOptions(SharedExperts: 1, RoutedExperts: 8, TopK: 2, ExpertHidden: 24, Scoring: RouterScoring.Sigmoid, RouteScale: 1.0,
                               BiasUpdateRate: 0.001, SequenceAuxAlpha: 0, CapacityFactor: 0);
        return new MoELayer(1, 32, o);
    }

    // Output, input gradient and every expert parameter's gradient of RunExperts under one kernel.
    private static (Tensor Y, Tensor DX, Tensor[] DW) RunWith(MoELayer layer, ExpertKernel kernel, int[] experts, Tensor rows, long[] counts, Tensor w)
    {
        layer.Kernel = kernel;
        layer.zero_grad();
        var x = rows.detach().clone().requires_grad_(true);
        var y = layer.RunExperts(experts, x, counts);
        (y * w).sum().backward();
        var dw = layer.Experts.parameters().Select(p => p.grad is { } g ? g.clone() : zeros_like(p)).ToArray();
        return (y.detach(), x.grad!.clone(), dw);
    }

    // "chunked": the CPU default (chunks side by side on the OpenMP team); "grouped": the bmm kernel with the
    // plan of this device (a CPU: every expert alone); "accelerator plan": groups planned as for a GPU (padded
    // bmm groups, single experts where one is far larger); "padded": one bmm.
    public static TheoryData<string, string> Routings()
    {
        var data = new TheoryData<string, string>();
        foreach (var padded in new[] { "chunked", "grouped", "accelerator plan", "padded" })
            foreach (var r in new[] { "random", "empty experts", "one expert takes every token", "equal counts", "near-equal counts", "one expert far larger", "a shard's subset", "single row" })
                data.Add(r, padded);
        return data;
    }

    [Theory]
    [MemberData(nameof(Routings))]
    public void Grouped_experts_equal_the_per_expert_loop_within_fp32_tolerance(string routing, string kernel)
    {
        using var layer = Fp32Layer();
        var rng = new Random(routing.Length * 7919);
        int[] experts;
        long[] counts;
        switch (routing)
        {
            case "random": experts = [.. Enumerable.Range(0, 8)]; counts = [.. experts.Select(_ => (long)rng.Next(1, 60))]; break;
            case "empty experts": experts = [.. Enumerable.Range(0, 8)]; counts = [0, 37, 0, 0, 5, 61, 0, 2]; break;
            case "one expert takes every token": experts = [.. Enumerable.Range(0, 8)]; counts = [0, 0, 0, 128, 0, 0, 0, 0]; break;
            case "equal counts": experts = [.. Enumerable.Range(0, 8)]; counts = [.. experts.Select(_ => 16L)]; break;
            case "near-equal counts": experts = [.. Enumerable.Range(0, 8)]; counts = [40, 40, 40, 39, 40, 40, 300, 300]; break;
            case "one expert far larger": experts = [.. Enumerable.Range(0, 8)]; counts = [30, 31, 29, 30, 9000, 30, 28, 30]; break;
            case "a shard's subset": experts = [6, 1, 4]; counts = [13, 0, 40]; break;
            default: experts = [2, 5]; counts = [1, 0]; break;
        }
        long m = counts.Sum();
        using var gen = new Generator(99);
        var rows = randn(new long[] { m, 32 }, generator: gen);
        var w = randn(new long[] { m, 32 }, generator: gen);

        var (yLoop, dxLoop, dwLoop) = RunWith(layer, ExpertKernel.Loop, experts, rows, counts, w);
        layer.PlanForAccelerator = kernel == "accelerator plan";
        var (yGrouped, dxGrouped, dwGrouped) = RunWith(layer, kernel switch { "padded" => ExpertKernel.Padded, "chunked" => ExpertKernel.Chunked, _ => ExpertKernel.Grouped },
                                                       experts, rows, counts, w);

        Assert.Equal(yLoop.shape, yGrouped.shape);
        Assert.True(allclose(yGrouped, yLoop, rtol: 1e-5, atol: 1e-6), $"outputs differ by {(yGrouped - yLoop).abs().max().item<float>():E3}");
        Assert.True(allclose(dxGrouped, dxLoop, rtol: 1e-5, atol: 1e-6), "input gradients differ");
        for (int i = 0; i < dwLoop.Length; i++)
        {
            // A weight gradient sums over all of an expert's rows: with 9,000 rows its entries reach ~65, and fp32
            // sums of them in another order (chunks of 256, then the partials) differ by ~1e-7 of that.
            double scale = Math.Max(1, dwLoop[i].abs().max().item<float>());
            Assert.True(allclose(dwGrouped[i], dwLoop[i], rtol: 1e-5, atol: 1e-6 * scale), $"expert parameter {i} gradient differs by {(dwGrouped[i] - dwLoop[i]).abs().max().item<float>():E3}, largest {dwLoop[i].abs().max().item<float>():E3}, relative norm {((dwGrouped[i] - dwLoop[i]).norm() / dwLoop[i].norm()).item<float>():E3}");
        }
        // Experts that got no rows get no gradient (exactly zero), in both paths.
        var touched = experts.Where((_, i) => counts[i] > 0).ToHashSet();
        var perExpert = layer.Experts.Select(e => e.parameters().Count()).First();
        for (int e = 0; e < 8; e++)
            if (!touched.Contains(e))
                for (int j = 0; j < perExpert; j++)
                    Assert.Equal(0.0, dwGrouped[e * perExpert + j].abs().sum().item<float>());
    }

    [Theory]
    [InlineData("Chunked")]
    [InlineData("Grouped")]
    public void Grouped_layer_forward_and_backward_equal_the_loop_and_repeat_bit_for_bit(string kernelName)
    {
        var kernel = Enum.Parse<ExpertKernel>(kernelName);
        using var layer = Fp32Layer();
        using var gen = new Generator(5);
        var x = randn(new long[] { 4, 16, 32 }, generator: gen);
        var w = randn(new long[] { 4, 16, 32 }, generator: gen);
        (Tensor Y, Tensor[] G) Run(ExpertKernel k)
        {
            layer.Kernel = k;
            layer.zero_grad();
            var xi = x.clone().requires_grad_(true);
            var y = layer.forward(xi);
            (y * w).sum().backward();
            return (y.detach(), [xi.grad!.clone(), .. layer.parameters().Select(p => p.grad!.clone())]);
        }
        var loop = Run(ExpertKernel.Loop);
        var first = Run(kernel);
        var second = Run(kernel);
        Assert.True(allclose(first.Y, loop.Y, rtol: 1e-5, atol: 1e-6));
        for (int i = 0; i < loop.G.Length; i++)
            Assert.True(allclose(first.G[i], loop.G[i], rtol: 1e-4, atol: 1e-5), $"gradient {i} differs from the loop");
        // Determinism: the same inputs give the same bits.
        Assert.True(first.Y.eq(second.Y).all().item<bool>());
        for (int i = 0; i < first.G.Length; i++)
            Assert.True(first.G[i].eq(second.G[i]).all().item<bool>(), $"gradient {i} differs between two identical runs");
    }

    [Fact]
    public void Expert_groups_cover_every_expert_in_order_and_follow_the_counts()
    {
        static void Covers(List<(int From, int To)> g, int n)
        {
            Assert.Equal(0, g[0].From);
            Assert.Equal(n, g[^1].To);
            for (int i = 1; i < g.Count; i++) Assert.Equal(g[i - 1].To, g[i].From);
        }
        // On a CPU every expert runs alone (its bits then do not depend on which experts share its call).
        Assert.Equal([(0, 1), (1, 2), (2, 3)], MoELayer.PlanGroups([256, 256, 256]));
        // On an accelerator: one padded group, unless one expert is so much larger that padding to it costs more than calls.
        Assert.Equal([(0, 8)], MoELayer.PlanGroups([256, 256, 256, 256, 256, 256, 256, 256], accelerator: true));
        Assert.Equal([(0, 4)], MoELayer.PlanGroups([100, 90, 80, 120], accelerator: true));
        var mixed = MoELayer.PlanGroups([64, 64, 64, 20000, 64, 64], accelerator: true);
        Covers(mixed, 6);
        Assert.Contains((3, 4), mixed);
        var random = new Random(3);
        var counts = Enumerable.Range(0, 40).Select(_ => (long)random.Next(1, 50000)).ToArray();
        Covers(MoELayer.PlanGroups(counts, accelerator: true), 40);
    }

    [Fact]
    public void Chunked_experts_compute_the_same_bits_alone_or_together_on_one_thread_or_two()
    {
        // What keeps the cluster equal to the single process: an expert's output and gradients depend on its own
        // rows only, not on which experts share its call (a shard holds a subset) nor on the thread count (nodes
        // of a box split its cores). 600 rows: three chunks, so the partial weight gradients are summed too.
        using var layer = Fp32Layer();
        long[] counts = [40, 600, 0, 17, 256, 300, 1, 90];
        int[] all = [.. Enumerable.Range(0, 8)];
        long m = counts.Sum();
        using var gen = new Generator(8);
        var rows = randn(new long[] { m, 32 }, generator: gen);
        var w = randn(new long[] { m, 32 }, generator: gen);
        var together = RunWith(layer, ExpertKernel.Chunked, all, rows, counts, w);
        int threads = get_num_threads();
        foreach (var t in new[] { 1, 2 })
        {
            set_num_threads(t);
            try
            {
                long offset = 0;
                for (int e = 0; e < 8; e++)
                {
                    var mine = rows.narrow(0, offset, counts[e]);
                    var alone = RunWith(layer, ExpertKernel.Chunked, [e], mine, [counts[e]], w.narrow(0, offset, counts[e]));
                    Assert.True(alone.Y.eq(together.Y.narrow(0, offset, counts[e])).all().item<bool>(), $"expert {e}'s output differs alone on {t} thread(s)");
                    Assert.True(alone.DX.eq(together.DX.narrow(0, offset, counts[e])).all().item<bool>(), $"expert {e}'s input gradient differs alone on {t} thread(s)");
                    var perExpert = layer.Experts[e].parameters().Count();
                    for (int j = 0; j < perExpert; j++)
                        Assert.True(alone.DW[e * perExpert + j].eq(together.DW[e * perExpert + j]).all().item<bool>(), $"expert {e}'s parameter {j} gradient differs alone on {t} thread(s)");
                    offset += counts[e];
                }
            }
            finally
            {
                set_num_threads(threads);
            }
        }
    }

    [Fact]
    public void Grouped_kernels_leave_no_live_tensors_behind()
    {
        using var layer = Fp32Layer();
        using var rows = randn(new long[] { 300, 32 });
        int[] experts = [.. Enumerable.Range(0, 8)];
        long[] counts = [30, 31, 29, 30, 120, 30, 0, 30];
        void Step(ExpertKernel kernel, bool? accelerator)
        {
            layer.Kernel = kernel;
            layer.PlanForAccelerator = accelerator;
            using var scope = NewDisposeScope();
            var x = rows.detach().requires_grad_(true);
            layer.RunExperts(experts, x, counts).sum().backward();
        }
        var modes = new (ExpertKernel, bool?)[] { (ExpertKernel.Chunked, null), (ExpertKernel.Grouped, null), (ExpertKernel.Grouped, true), (ExpertKernel.Padded, null), (ExpertKernel.Loop, null) };
        foreach (var (k, a) in modes) Step(k, a);
        layer.zero_grad();
        long before = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
        for (int i = 0; i < 20; i++)
            foreach (var (k, a) in modes) Step(k, a);
        layer.zero_grad();
        Assert.Equal(before, DisposeScopeManager.Statistics.ThreadTotalLiveCount);
    }
}
