using ElasticMoE.Configuration;
using ElasticMoE.Data;
using ElasticMoE.Training;

namespace ElasticMoE.Tests.Cluster;

/// <summary>What the cluster must reproduce: the single-process loop's steps and final parameters for a config.</summary>
public static class SingleProcessReference
{
    public static (List<StepResult> Steps, Dictionary<string, (double Sum, double Norm)> Params) Train(ElasticMoEConfig cfg, int steps)
    {
        using var t = new Trainer(cfg, TextCorpus.Default(cfg.Data.ValidationFraction, cfg.Model.Context));
        var results = Enumerable.Range(0, steps).Select(_ => t.TrainStep()).ToList();
        var ps = t.Model.named_parameters().ToDictionary(p => p.name, p =>
            (p.parameter.detach().to(TorchSharp.torch.ScalarType.Float64).sum().item<double>(),
             p.parameter.detach().to(TorchSharp.torch.ScalarType.Float64).norm().item<double>()));
        return (results, ps);
    }

    /// <summary>
    /// A metrics file written by a cluster run: exactly one line per step 1..N, each step's loss and
    /// gradient norm within 1e-4 relative of <paramref name="reference"/>.
    /// </summary>
    public static void AssertMetricsMatch(string metricsPath, IReadOnlyList<StepResult> reference)
    {
        var lines = File.ReadAllLines(metricsPath).Select(l => System.Text.Json.JsonDocument.Parse(l).RootElement).ToList();
        Assert.Equal(Enumerable.Range(1, reference.Count), lines.Select(l => l.GetProperty("step").GetInt32()));
        for (int i = 0; i < reference.Count; i++)
        {
            double loss = lines[i].GetProperty("loss").GetDouble(), g = lines[i].GetProperty("grad_norm").GetDouble();
            Assert.True(Math.Abs(loss - reference[i].Loss) <= 1e-4 * reference[i].Loss, $"step {i}: loss {loss:R} vs {reference[i].Loss:R}");
            Assert.True(Math.Abs(g - reference[i].GradNorm) <= 1e-4 * reference[i].GradNorm, $"step {i}: gradient norm {g:R} vs {reference[i].GradNorm:R}");
        }
    }
}
