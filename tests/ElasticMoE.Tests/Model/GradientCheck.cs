using static TorchSharp.torch;

namespace ElasticMoE.Tests.Model;

/// <summary>Finite-difference checks of analytic gradients (torch.autograd.gradcheck's idea, on sampled entries).</summary>
public static class GradientCheck
{
    /// <summary>
    /// For <paramref name="perTensor"/> random entries of each tensor, the central difference of <paramref name="loss"/>
    /// against the gradient already in the tensor's <c>grad</c>; returns how many entries were checked.
    /// </summary>
    public static int AssertMatches(Func<double> loss, IEnumerable<(string Name, Tensor P)> tensors, Random rng, int perTensor,
        double absolute, double relative, double h = 1e-6)
    {
        int checkedEntries = 0;
        foreach (var (name, p) in tensors)
        {
            var grad = p.grad!.reshape(-1).data<double>().ToArray();
            var flat = p.detach().reshape(-1);
            for (int i = 0; i < perTensor; i++)
            {
                long idx = rng.NextInt64(flat.shape[0]);
                double orig = flat[idx].item<double>();
                using (no_grad()) flat[idx] = orig + h;
                double up = loss();
                using (no_grad()) flat[idx] = orig - h;
                double down = loss();
                using (no_grad()) flat[idx] = orig;
                double numeric = (up - down) / (2 * h);
                Assert.True(Math.Abs(numeric - grad[idx]) <= absolute + relative * Math.Abs(numeric),
                    $"{name}[{idx}]: analytic {grad[idx]:E8} vs numeric {numeric:E8}");
                checkedEntries++;
            }
        }
        return checkedEntries;
    }
}
