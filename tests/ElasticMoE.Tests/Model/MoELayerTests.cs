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

        const double h = 1e-6;
        var rng = new Random(5);
        var checks = new List<(string Name, Tensor P)> { ("input", x) };
        checks.AddRange(layer.named_parameters().Select(p => (p.name, (Tensor)p.parameter)));
        int checkedEntries = 0;
        foreach (var (name, p) in checks)
        {
            var grad = p.grad!.reshape(-1).data<double>().ToArray();
            var flat = p.detach().reshape(-1);
            for (int i = 0; i < 6; i++)
            {
                long idx = rng.NextInt64(flat.shape[0]);
                double orig = flat[idx].item<double>();
                using (no_grad()) flat[idx] = orig + h;
                double up = Loss();
                using (no_grad()) flat[idx] = orig - h;
                double down = Loss();
                using (no_grad()) flat[idx] = orig;
                double numeric = (up - down) / (2 * h);
                Assert.True(Math.Abs(numeric - grad[idx]) <= 1e-6 + 1e-5 * Math.Abs(numeric),
                    $"{name}[{idx}]: analytic {grad[idx]:E6} vs numeric {numeric:E6}");
                checkedEntries++;
            }
        }
        Assert.True(checkedEntries >= 6 * 9);
        // The router learns through the gates: its weight must get a real gradient.
        Assert.True(layer.Router.Gate.weight!.grad!.abs().sum().item<double>() > 0);
    }

    [Fact]
    public void Dispatch_expert_combine_path_equals_the_dense_fused_path()
    {
        using var layer = Layer();
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
}
