using ElasticMoE.Configuration;
using ElasticMoE.Model;
using ElasticMoE.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace ElasticMoE.Tests.Model;

public class RouterTests
{
    private static MoEOptions Options(RouterScoring scoring, int experts = 4, int k = 2, double routeScale = 1.0)
        => new(SharedExperts: 0, RoutedExperts: experts, TopK: k, ExpertHidden: 4, Scoring: scoring, RouteScale: routeScale,
               BiasUpdateRate: 0.001, SequenceAuxAlpha: 0, CapacityFactor: 0);

    // logits for x = [2, 1] are W·x = [2, 1, -2, 1.5].
    private static Router HandRouter(RouterScoring scoring, double routeScale = 1.0)
    {
        TestSupport.EnsureTorch();
        var r = new Router(2, Options(scoring, routeScale: routeScale));
        using (no_grad())
            r.Gate.weight!.copy_(tensor(new float[] { 1, 0, 0, 1, -1, 0, 0.5f, 0.5f }, new long[] { 4, 2 }));
        return r;
    }

    private static double Sigmoid(double z) => 1 / (1 + Math.Exp(-z));

    [Fact]
    public void Sigmoid_router_picks_top_k_and_normalises_gates_over_the_chosen()
    {
        using var r = HandRouter(RouterScoring.Sigmoid);
        using var x = tensor(new float[] { 2, 1 }, new long[] { 1, 2 });
        var routing = r.forward(x);
        // sigmoid: [0.8808, 0.7311, 0.1192, 0.8176] → experts 0 and 3.
        Assert.Equal(new long[] { 0, 3 }, routing.Indices.data<long>().ToArray());
        double s0 = Sigmoid(2), s3 = Sigmoid(1.5);
        var gates = routing.Gates.data<float>().ToArray();
        Assert.Equal(s0 / (s0 + s3), gates[0], 5);
        Assert.Equal(s3 / (s0 + s3), gates[1], 5);
        Assert.Equal(0.518612, gates[0], 5);
    }

    [Fact]
    public void Bias_changes_the_choice_but_never_the_gate_values()
    {
        using var r = HandRouter(RouterScoring.Sigmoid);
        using (no_grad()) r.Bias.copy_(tensor(new float[] { 0, 0.2f, 0, 0 }));
        using var x = tensor(new float[] { 2, 1 }, new long[] { 1, 2 });
        var routing = r.forward(x);
        // choice = score + bias = [0.8808, 0.9311, 0.1192, 0.8176] → experts 1 and 0.
        Assert.Equal(new long[] { 1, 0 }, routing.Indices.data<long>().ToArray());
        double s0 = Sigmoid(2), s1 = Sigmoid(1);
        var gates = routing.Gates.data<float>().ToArray();
        Assert.Equal(s1 / (s0 + s1), gates[0], 5);   // 0.453550: from the score, not score + bias
        Assert.Equal(s0 / (s0 + s1), gates[1], 5);
    }

    [Fact]
    public void Softmax_router_gates_are_the_softmax_probabilities_of_the_chosen_scaled()
    {
        using var r = HandRouter(RouterScoring.Softmax, routeScale: 2.0);
        using var x = tensor(new float[] { 2, 1 }, new long[] { 1, 2 });
        var routing = r.forward(x);
        double z = Math.Exp(2) + Math.Exp(1) + Math.Exp(-2) + Math.Exp(1.5);
        Assert.Equal(new long[] { 0, 3 }, routing.Indices.data<long>().ToArray());
        var gates = routing.Gates.data<float>().ToArray();
        Assert.Equal(2.0 * Math.Exp(2) / z, gates[0], 5);
        Assert.Equal(2.0 * Math.Exp(1.5) / z, gates[1], 5);
    }

    [Fact]
    public void Bias_update_follows_the_sign_rule()
    {
        TestSupport.EnsureTorch();
        using var r = new Router(2, Options(RouterScoring.Sigmoid));
        r.UpdateBias(new long[] { 10, 2, 4, 4 }, 0.5);   // mean 5
        Assert.Equal(new float[] { -0.5f, 0.5f, 0.5f, 0.5f }, r.Bias.data<float>().ToArray());
        r.UpdateBias(new long[] { 5, 5, 5, 5 }, 0.5);    // balanced: no move
        Assert.Equal(new float[] { -0.5f, 0.5f, 0.5f, 0.5f }, r.Bias.data<float>().ToArray());
    }

    [Fact]
    public void Bias_updates_drive_a_skewed_router_towards_balance()
    {
        TestSupport.EnsureTorch();
        const int experts = 8, dim = 16, tokens = 1024;
        using var r = new Router(dim, Options(RouterScoring.Sigmoid, experts, k: 2));
        using var gen = new Generator(7);
        using (no_grad())
        {
            // Experts 0 and 1 align with the tokens' common direction, so they win almost every token.
            var w = randn(experts, dim, generator: gen) * 0.1;
            w[0] += 0.3;
            w[1] += 0.2;
            r.Gate.weight!.copy_(w);
        }
        double VioOf(Tensor x)
        {
            using var scope = NewDisposeScope();
            var routing = r.forward(x);
            var counts = bincount(routing.Indices.reshape(-1), minlength: experts).data<long>().ToArray();
            r.UpdateBias(counts, 0.005);
            return LoadBalance.MaxVio(counts);
        }
        var vios = new List<double>();
        for (int i = 0; i < 400; i++)
        {
            using var x = randn(tokens, dim, generator: gen) * 0.5 + 1.0;
            vios.Add(VioOf(x));
        }
        double first = vios.Take(5).Average(), last = vios.TakeLast(20).Average();
        Assert.True(first > 2.0, $"the synthetic router should start skewed, MaxVio {first:F3}");
        Assert.True(last < 0.25 * first && last < 0.5, $"MaxVio should fall: first {first:F3}, last {last:F3}");
    }
}
