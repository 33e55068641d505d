using ElasticMoE.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace ElasticMoE.Tests.Training;

/// <summary>The fused AdamW update and sum of squares (float32 CPU tensors) against the libtorch ops kept for everything else.</summary>
public class AdamWKernelTests
{
    private static List<(string Name, Tensor Param)> Parameters(ScalarType dtype, params long[][] shapes)
    {
        TestSupport.EnsureTorch();
        torch.manual_seed(21);
        return shapes.Select((shape, i) =>
        {
            var p = randn(shape).to(dtype).requires_grad_(true);
            return ($"p{i}", p);
        }).ToList();
    }

    private static void SetGradients(List<(string Name, Tensor Param)> ps, int step)
    {
        torch.manual_seed(100 + step);
        foreach (var (_, p) in ps)
        {
            using var g = randn(p.shape).mul(ElasticMoE.Model.Scalars.Of(0.1 * (1 + step)));
            p.grad = g.to(p.dtype);
        }
    }

    [Fact]
    public void The_fused_update_follows_the_ops_update_run_in_float64()
    {
        long[][] shapes = [[96, 128], [128], [3, 5, 7], [1]];
        var fused = Parameters(ScalarType.Float32, shapes);
        var reference = fused.Select(p => (p.Name, Param: p.Param.detach().to(ScalarType.Float64).requires_grad_(true))).ToList();
        using var a = new AdamW(0.9, 0.95, 1e-8, 0.1);
        using var b = new AdamW(0.9, 0.95, 1e-8, 0.1);
        for (int step = 0; step < 5; step++)
        {
            SetGradients(fused, step);
            SetGradients(reference, step);
            double clip = step % 2 == 0 ? 1.0 : 0.37;
            a.Step(fused, 3e-3, clip);
            b.Step(reference, 3e-3, clip); // float64: the libtorch-ops path
        }
        for (int i = 0; i < shapes.Length; i++)
        {
            using var diff = (fused[i].Param.detach().to(ScalarType.Float64) - reference[i].Param.detach()).abs().max();
            Assert.True(diff.item<double>() < 2e-6, $"{fused[i].Name}: {diff.item<double>():E2}");
            using var dm = (a.Moments[$"p{i}"].V.to(ScalarType.Float64) - b.Moments[$"p{i}"].V).abs().max();
            Assert.True(dm.item<double>() < 1e-7, $"{fused[i].Name} second moment: {dm.item<double>():E2}");
        }
        // Decay pulled the matrices only: a vector parameter with a zero gradient keeps its value.
        var still = Parameters(ScalarType.Float32, [[4], [2, 2]]);
        var before = still.Select(p => p.Param.detach().clone()).ToList();
        foreach (var (_, p) in still) p.grad = zeros_like(p);
        using var c = new AdamW(0.9, 0.95, 1e-8, 0.5);
        c.Step(still, 0.1);
        Assert.Equal(before[0].data<float>().ToArray(), still[0].Param.data<float>().ToArray());
        Assert.NotEqual(before[1].data<float>().ToArray(), still[1].Param.data<float>().ToArray());
    }

    [Fact]
    public void An_elements_update_does_not_depend_on_the_tensor_it_sits_in_or_the_thread_count()
    {
        var whole = Parameters(ScalarType.Float32, [[1001]]);
        var halves = new List<(string Name, Tensor Param)>
        {
            ("a", whole[0].Param.detach().narrow(0, 0, 501).clone().requires_grad_(true)),
            ("b", whole[0].Param.detach().narrow(0, 501, 500).clone().requires_grad_(true)),
        };
        using var gen = new Generator(9);
        using var grad = randn(new long[] { 1001 }, generator: gen);
        whole[0].Param.grad = grad.clone();
        halves[0].Param.grad = grad.narrow(0, 0, 501).clone();
        halves[1].Param.grad = grad.narrow(0, 501, 500).clone();
        int threads = torch.get_num_threads();
        using var a = new AdamW(0.9, 0.95, 1e-8, 0.1);
        using var b = new AdamW(0.9, 0.95, 1e-8, 0.1);
        a.Step(whole, 1e-2, 0.5);
        torch.set_num_threads(1);
        try
        {
            b.Step(halves, 1e-2, 0.5);
        }
        finally
        {
            torch.set_num_threads(threads);
        }
        Assert.Equal(whole[0].Param.data<float>().ToArray(), cat([halves[0].Param.detach(), halves[1].Param.detach()]).data<float>().ToArray());
    }

    [Fact]
    public void A_gradient_laid_out_otherwise_takes_the_same_path_and_gives_the_same_bits()
    {
        var a = Parameters(ScalarType.Float32, [[4, 6]]);
        var b = new List<(string Name, Tensor Param)> { ("p0", a[0].Param.detach().clone().requires_grad_(true)) };
        using var gen = new Generator(4);
        using var transposed = randn(new long[] { 6, 4 }, generator: gen);
        a[0].Param.grad = transposed.t();             // strides (1, 4)
        b[0].Param.grad = transposed.t().contiguous();
        Assert.False(a[0].Param.grad!.is_contiguous());
        Assert.Equal(GradClip.SumOfSquares([a[0].Param]), GradClip.SumOfSquares([b[0].Param]));
        using var oa = new AdamW(0.9, 0.95, 1e-8, 0.1);
        using var ob = new AdamW(0.9, 0.95, 1e-8, 0.1);
        oa.Step(a, 1e-2, 0.7);
        ob.Step(b, 1e-2, 0.7);
        Assert.Equal(b[0].Param.data<float>().ToArray(), a[0].Param.data<float>().ToArray());
    }

    [Fact]
    public void The_sum_of_squares_is_exact_to_float64_rounding_for_float32_and_float64_gradients()
    {
        var ps = Parameters(ScalarType.Float32, [[96, 128], [7], [3, 3]]);
        ps.AddRange(Parameters(ScalarType.Float64, [[5, 5]]).Select(p => ("d" + p.Name, p.Param)));
        SetGradients(ps, 0);
        double exact = ps.Sum(p => p.Param.grad!.to(ScalarType.Float64).data<double>().ToArray().Sum(v => v * v));
        double got = GradClip.SumOfSquares(ps.Select(p => p.Param));
        Assert.True(Math.Abs(got - exact) <= 1e-12 * exact, $"{got:R} vs {exact:R}");
        // A parameter without a gradient counts nothing.
        var none = Parameters(ScalarType.Float32, [[3]]);
        Assert.Equal(0.0, GradClip.SumOfSquares(none.Select(p => p.Param)));
    }
}
