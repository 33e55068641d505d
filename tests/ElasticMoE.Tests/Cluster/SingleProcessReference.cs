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
}
