using ElasticMoE.Configuration;
using ElasticMoE.Data;
using ElasticMoE.Training;

namespace ElasticMoE.Tests.Cluster;

/// <summary>What the cluster must reproduce: the single-process loop's steps and final parameters for a config.</summary>
public static class SingleProcessReference
{
    public static (List<StepResult> Steps, Dictionary<string, (double Sum, double Norm)> Params) Train(ElasticMoEConfig cfg, int steps)
    {
        using var t = new Trainer(cfg, TextCorpus.Default(cfg.Data.ValidationFraction, cfg.Model.Context, Tokenizers.For(cfg.Model.Tokenizer)));
        var results = Enumerable.Range(0, steps).Select(_ => t.TrainStep()).ToList();
        return (results, Parameters(t));
    }

    /// <summary>Every parameter of the trainer's model as (sum, L2 norm) in float64, as a cluster's RunResult reports them.</summary>
    public static Dictionary<string, (double Sum, double Norm)> Parameters(Trainer t) => t.Model.named_parameters().ToDictionary(p => p.name, p =>
        (p.parameter.detach().to(TorchSharp.torch.ScalarType.Float64).sum().item<double>(),
         p.parameter.detach().to(TorchSharp.torch.ScalarType.Float64).norm().item<double>()));

    /// <summary>
    /// Every step's loss and gradient norm equal to <paramref name="reference"/>'s, bit for bit (the canonical
    /// reduction holds for every layout and membership history), and as many steps. Returns the worst relative loss
    /// difference (0).
    /// </summary>
    public static double AssertStepsMatch(string name, IReadOnlyList<(double Loss, double GradNorm)> steps, IReadOnlyList<StepResult> reference)
    {
        AssertStepsIdentical(name, steps, reference);
        return 0;
    }

    /// <summary>
    /// Every step's loss and gradient norm bit-identical to <paramref name="reference"/>'s (the canonical reduction:
    /// any layout sums in the single-process loop's order), and as many steps.
    /// </summary>
    public static void AssertStepsIdentical(string name, IReadOnlyList<(double Loss, double GradNorm)> steps, IReadOnlyList<StepResult> reference)
    {
        Assert.Equal(reference.Count, steps.Count);
        for (int i = 0; i < reference.Count; i++)
        {
            Assert.True(steps[i].Loss.Equals(reference[i].Loss), $"{name}: step {i} loss {steps[i].Loss:R} vs single-process {reference[i].Loss:R}");
            Assert.True(steps[i].GradNorm.Equals(reference[i].GradNorm), $"{name}: step {i} gradient norm {steps[i].GradNorm:R} vs single-process {reference[i].GradNorm:R}");
        }
    }

    /// <inheritdoc cref="AssertStepsIdentical(string, IReadOnlyList{ValueTuple{double, double}}, IReadOnlyList{StepResult})"/>
    public static void AssertStepsIdentical(string name, IReadOnlyList<StepResult> steps, IReadOnlyList<StepResult> reference)
        => AssertStepsIdentical(name, steps.Select(s => (s.Loss, s.GradNorm)).ToList(), reference);

    /// <summary>Every parameter exists once in the cluster, and ends bit for bit where the single process put it (sum and norm in float64).</summary>
    public static void AssertParametersIdentical(string name, IReadOnlyDictionary<string, (double Sum, double Norm)> expected,
        IReadOnlyDictionary<string, (double Sum, double Norm)> got)
    {
        Assert.Equal(expected.Keys.Order(), got.Keys.Order());
        foreach (var (pname, value) in expected)
            Assert.True(got[pname].Equals(value), $"{name}: {pname} (sum, norm) {got[pname]} vs {value}");
    }

    /// <inheritdoc cref="AssertStepsMatch(string, IReadOnlyList{ValueTuple{double, double}}, IReadOnlyList{StepResult})"/>
    public static double AssertStepsMatch(string name, IReadOnlyList<StepResult> steps, IReadOnlyList<StepResult> reference)
        => AssertStepsMatch(name, steps.Select(s => (s.Loss, s.GradNorm)).ToList(), reference);

    /// <summary>Every parameter exists once in the cluster, and ends where the single process put it.</summary>
    public static void AssertParametersMatch(string name, IReadOnlyDictionary<string, (double Sum, double Norm)> expected,
        IReadOnlyDictionary<string, (double Sum, double Norm)> got)
    {
        Assert.Equal(expected.Keys.Order(), got.Keys.Order());
        foreach (var (pname, (sum, norm)) in expected)
        {
            var (gotSum, gotNorm) = got[pname];
            Assert.True(Math.Abs(gotNorm - norm) <= 1e-3 * norm + 1e-6, $"{name}: {pname} norm {gotNorm} vs {norm}");
            Assert.True(Math.Abs(gotSum - sum) <= 1e-3 * norm * 10 + 1e-5, $"{name}: {pname} sum {gotSum} vs {sum}");
        }
    }

    /// <summary>
    /// A metrics file written by a cluster run: exactly one line per step 1..N, each step as
    /// <see cref="AssertStepsMatch(string, IReadOnlyList{ValueTuple{double, double}}, IReadOnlyList{StepResult})"/> asks.
    /// </summary>
    public static void AssertMetricsMatch(string metricsPath, IReadOnlyList<StepResult> reference)
    {
        // Step lines only: membership changes have event lines of their own.
        var lines = File.ReadAllLines(metricsPath).Select(l => System.Text.Json.JsonDocument.Parse(l).RootElement)
            .Where(l => !l.TryGetProperty("event", out _)).ToList();
        Assert.Equal(Enumerable.Range(1, reference.Count), lines.Select(l => l.GetProperty("step").GetInt32()));
        AssertStepsMatch(metricsPath, lines.Select(l => (l.GetProperty("loss").GetDouble(), l.GetProperty("grad_norm").GetDouble())).ToList(), reference);
    }
}
