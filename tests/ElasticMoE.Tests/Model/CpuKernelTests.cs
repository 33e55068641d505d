using ElasticMoE.Configuration;
using ElasticMoE.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace ElasticMoE.Tests.Model;

/// <summary>
/// The CPU kernels written as loops over raw memory (the router after its logits, the SwiGLU elementwise steps)
/// against the libtorch ops they replace.
/// </summary>
public class CpuKernelTests
{
    private static Router NewRouter(RouterScoring scoring, double alpha, ScalarType dtype, double routeScale = 1.0, int experts = 8, int k = 2)
    {
        TestSupport.EnsureTorch();
        torch.manual_seed(7);
        var o = new MoEOptions(SharedExperts: 1, RoutedExperts: experts, TopK: k, ExpertHidden: 4, Scoring: scoring, RouteScale: routeScale,
                               BiasUpdateRate: 0.001, SequenceAuxAlpha: alpha, CapacityFactor: 0);
        var router = new Router(16, o);
        router.to(dtype);
        using (no_grad()) router.Bias.copy_(randn(experts, dtype: dtype).mul(Scalars.Of(0.05)));
        return router;
    }

    [Theory]
    [InlineData(RouterScoring.Sigmoid, 0.0, 1.0)]
    [InlineData(RouterScoring.Sigmoid, 0.01, 2.5)]
    [InlineData(RouterScoring.Softmax, 0.0, 1.0)]
    [InlineData(RouterScoring.Softmax, 0.01, 2.5)]
    public void The_router_function_equals_the_tensor_ops_forward_and_backward_in_float64(RouterScoring scoring, double alpha, double routeScale)
    {
        using var router = NewRouter(scoring, alpha, ScalarType.Float64, routeScale);
        using var scope = NewDisposeScope();
        using var gen = new Generator(5);
        var x = randn(new long[] { 300, 16 }, ScalarType.Float64, generator: gen);
        var wGates = randn(new long[] { 300, 2 }, ScalarType.Float64, generator: gen);
        var wScores = randn(new long[] { 300, 8 }, ScalarType.Float64, generator: gen);

        (Tensor Indices, Tensor Gates, Tensor Scores, Tensor DLogits, bool ScoresHaveGradient) Run(bool fused)
        {
            var logits = router.Gate.forward(x).detach().requires_grad_(true);
            var r = fused ? RouteFunction.Route(logits, router.Bias, router.Options) : router.RouteWithOps(logits);
            var loss = r.Gates.mul(wGates).sum();
            if (alpha > 0) loss = loss.Plus(r.Scores.mul(wScores).sum());
            loss.backward();
            return (r.Indices, r.Gates.detach(), r.Scores.detach(), logits.grad!, r.Scores.requires_grad);
        }

        var fused = Run(fused: true);
        var ops = Run(fused: false);
        Assert.Equal(ops.Indices.data<long>().ToArray(), fused.Indices.data<long>().ToArray());
        AssertClose(ops.Gates, fused.Gates, 1e-14);
        AssertClose(ops.Scores, fused.Scores, 1e-14);
        AssertClose(ops.DLogits, fused.DLogits, 1e-13);
        Assert.Equal(alpha > 0, fused.ScoresHaveGradient); // only when the sequence-wise balance loss reads them
    }

    [Fact]
    public void The_router_function_gives_the_same_bits_on_one_thread_or_two()
    {
        using var router = NewRouter(RouterScoring.Sigmoid, 0, ScalarType.Float32);
        using var gen = new Generator(3);
        // 700 rows: pieces of 256, 256 and 188 on the team.
        var logits = randn(new long[] { 700, 8 }, generator: gen);
        var wGates = randn(new long[] { 700, 2 }, generator: gen);
        (long[] Indices, float[] Gates, float[] DLogits) Run()
        {
            using var scope = NewDisposeScope();
            var l = logits.detach().clone().requires_grad_(true);
            var r = RouteFunction.Route(l, router.Bias, router.Options);
            r.Gates.mul(wGates).sum().backward();
            return (r.Indices.data<long>().ToArray(), r.Gates.data<float>().ToArray(), l.grad!.data<float>().ToArray());
        }
        int threads = get_num_threads();
        try
        {
            set_num_threads(1);
            var one = Run();
            set_num_threads(2);
            var two = Run();
            Assert.Equal(one.Indices, two.Indices);
            Assert.Equal(one.Gates, two.Gates);
            Assert.Equal(one.DLogits, two.DLogits);
        }
        finally
        {
            set_num_threads(threads);
        }
    }

    [Fact]
    public void The_router_function_in_float32_chooses_as_the_ops_and_gates_agree_to_float_precision()
    {
        using var router = NewRouter(RouterScoring.Sigmoid, 0, ScalarType.Float32);
        using var scope = NewDisposeScope();
        var x = randn(1024, 16);
        var logits = router.Gate.forward(x).detach();
        var fused = RouteFunction.Route(logits, router.Bias, router.Options);
        var ops = router.RouteWithOps(logits);
        var a = fused.Indices.data<long>().ToArray();
        var b = ops.Indices.data<long>().ToArray();
        // Different roundings of the same sigmoid may order two near-equal experts differently; nearly never.
        Assert.True(a.Zip(b).Count(p => p.First != p.Second) <= 4, "top-k choices differ");
        AssertClose(ops.Scores, fused.Scores, 1e-6);
    }

    [Fact]
    public void Ties_go_to_the_lower_expert_and_a_NaN_logit_still_gives_valid_indices()
    {
        using var router = NewRouter(RouterScoring.Sigmoid, 0, ScalarType.Float32, experts: 4, k: 2);
        using (no_grad()) router.Bias.zero_();
        using var scope = NewDisposeScope();
        var logits = tensor(new float[] { 1, 1, 1, 1, float.NaN, 0, 0, 0 }, new long[] { 2, 4 });
        var r = RouteFunction.Route(logits, router.Bias, router.Options);
        var indices = r.Indices.data<long>().ToArray();
        Assert.Equal(new long[] { 0, 1 }, indices[..2]);
        Assert.All(indices[2..], i => Assert.InRange(i, 0, 3));
        Assert.Equal(new[] { 0.5f, 0.5f }, r.Gates.data<float>().ToArray()[..2]);
    }

    [Fact]
    public void Fast_exp_is_within_two_ulp_of_the_exact_exponential_and_keeps_the_edges()
    {
        var n = System.Numerics.Vector<float>.Count;
        var xs = new List<float>();
        for (double v = -87; v <= 88; v += 0.0137) xs.Add((float)v);
        xs.AddRange([0f, -0f, 1e-30f, -1e-30f]);
        double worst = 0;
        var buffer = new float[n];
        for (int i = 0; i < xs.Count; i += n)
        {
            Array.Clear(buffer);
            int count = Math.Min(n, xs.Count - i);
            xs.CopyTo(i, buffer, 0, count);
            var e = SwiGLUMath.ExpF(new System.Numerics.Vector<float>(buffer));
            for (int j = 0; j < count; j++)
            {
                double exact = Math.Exp(buffer[j]);
                double ulp = (double)MathF.BitIncrement((float)exact) - (float)exact;
                worst = Math.Max(worst, Math.Abs(e[j] - exact) / ulp);
            }
        }
        Assert.True(worst <= 2, $"worst error {worst:F2} ulp");
        var edges = SwiGLUMath.ExpF(new System.Numerics.Vector<float>(Enumerable.Range(0, n).Select(j => (j % 4) switch
        {
            0 => float.NaN, 1 => float.PositiveInfinity, 2 => float.NegativeInfinity, _ => 200f,
        }).ToArray()));
        Assert.True(float.IsNaN(edges[0]));
        Assert.True(edges[1] > 1e38f);
        Assert.InRange(edges[2], 0f, 1.2e-38f);
        Assert.True(edges[3] > 1e38f);
    }

    [Theory]
    [InlineData(96)]
    [InlineData(13)]  // a row tail shorter than a vector
    [InlineData(3)]
    public void Swiglu_elementwise_steps_equal_the_ops_and_an_elements_bits_do_not_depend_on_its_position(int hidden)
    {
        TestSupport.EnsureTorch();
        using var scope = NewDisposeScope();
        torch.manual_seed(3);
        var h = randn(37, 2 * hidden).mul(Scalars.Of(3.0));
        var da = randn(37, hidden);
        var a = empty(37, hidden);
        var dh = empty(37, 2 * hidden);
        SwiGLUMath.Forward(h, a);
        SwiGLUMath.Backward(h, da, dh);

        var h64 = h.to(ScalarType.Float64).requires_grad_(true);
        var a64 = nn.functional.silu(h64.narrow(1, 0, hidden)) * h64.narrow(1, hidden, hidden);
        a64.backward([da.to(ScalarType.Float64)]);
        AssertClose(a64.detach().to(ScalarType.Float32), a, 2e-6);
        AssertClose(h64.grad!.to(ScalarType.Float32), dh, 2e-6);

        // The same values, one row per element position: a row's tail must round exactly like its body.
        var gRow = h.narrow(1, 0, hidden).reshape(-1);
        var uRow = h.narrow(1, hidden, hidden).reshape(-1);
        long total = gRow.shape[0];
        var hFlat = cat([gRow.view(1, total), uRow.view(1, total)], 1).contiguous();
        var aFlat = empty(1, total);
        SwiGLUMath.Forward(hFlat, aFlat);
        Assert.Equal(a.contiguous().data<float>().ToArray(), aFlat.data<float>().ToArray());
    }

    [Theory]
    [InlineData(0, new long[0])]
    [InlineData(1, new long[] { 1 })]
    [InlineData(767, new long[] { 767 })]
    [InlineData(768, new long[] { 384, 384 })]
    [InlineData(1024, new long[] { 512, 512 })]
    [InlineData(1283, new long[] { 428, 428, 427 })]
    public void Segments_are_cut_into_near_equal_chunks_by_their_row_count(long rows, long[] expected)
    {
        var cut = SwiGLUChunks.Cut(rows).ToList();
        Assert.Equal(expected, cut.Select(c => c.Rows));
        long offset = 0;
        foreach (var (o, n) in cut)
        {
            Assert.Equal(offset, o);
            offset += n;
        }
        Assert.Equal(rows, offset);
    }

    [Theory]
    [InlineData(false, false)]
    [InlineData(true, false)]  // the shared experts' output added in the same pass
    [InlineData(true, true)]   // a capacity limit drops assignments: they read nothing and get no gradient
    public void Combine_and_dispatch_equal_the_gather_ops_forward_and_backward_in_float64(bool withShared, bool dropSome)
    {
        TestSupport.EnsureTorch();
        using var scope = NewDisposeScope();
        using var gen = new Generator(13);
        const int n = 300, k = 2, experts = 6, d = 20;
        var indices = randint(0, experts, new long[] { n, k }, generator: gen);
        using var plan = DispatchPlan.Create(indices, experts, dropSome ? 80 : null);
        Assert.Equal(dropSome, plan.Dropped > 0);
        var x = randn(new long[] { n, d }, ScalarType.Float64, generator: gen);
        var gates = rand(new long[] { n, k }, ScalarType.Float64, generator: gen);
        var shared = randn(new long[] { n, d }, ScalarType.Float64, generator: gen);
        var w = randn(new long[] { n, d }, ScalarType.Float64, generator: gen);

        (Tensor Y, Tensor Dx, Tensor DGates, Tensor? DShared) Run(bool kernels)
        {
            var xi = x.detach().requires_grad_(true);
            var gi = gates.detach().requires_grad_(true);
            var si = shared.detach().requires_grad_(true);
            Tensor y;
            if (kernels) y = plan.Combine(plan.Dispatch(xi), gi, n, withShared ? si : null);
            else
            {
                // The same maths as plain gathers under autograd: rows per assignment, a zero row for a dropped one.
                var rows = xi.index_select(0, plan.TokenIndex);
                var padded = cat([rows, zeros(1, d, dtype: ScalarType.Float64)], 0);
                y = padded.index_select(0, plan.Position).view(n, k, d).mul(gi.unsqueeze(-1)).sum(1);
                if (withShared) y = y + si;
            }
            y.mul(w).sum().backward();
            return (y.detach(), xi.grad!, gi.grad!, withShared ? si.grad : null);
        }

        var fast = Run(kernels: true);
        var reference = Run(kernels: false);
        AssertClose(reference.Y, fast.Y, 1e-14);
        AssertClose(reference.Dx, fast.Dx, 1e-14);
        AssertClose(reference.DGates, fast.DGates, 1e-14);
        if (withShared) AssertClose(reference.DShared!, fast.DShared!, 0);
    }

    private static void AssertClose(Tensor expected, Tensor actual, double tolerance)
    {
        double scale = Math.Max(1e-30, expected.abs().max().to(ScalarType.Float64).item<double>());
        double diff = (expected.to(ScalarType.Float64) - actual.to(ScalarType.Float64)).abs().max().item<double>();
        Assert.True(diff <= tolerance * scale, $"max difference {diff:E3} (relative {diff / scale:E3}) over tolerance {tolerance:E1}");
    }
}
