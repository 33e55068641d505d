using System.CommandLine;
using System.Globalization;
using System.Text.Json;
using ElasticMoE.Benchmarks;
using ElasticMoE.Data;

namespace ElasticMoE.Cli;

/// <summary>
/// <c>elasticmoe bench</c>: throughput and efficiency figures, each as a ratio against a baseline measured
/// in the same run on the same machine, never against a number remembered from elsewhere.
/// </summary>
public static class BenchCommand
{
    public static readonly string[] Suites = ["train", "leak"];

    public static Command Create(TextWriter stdout, TextWriter stderr)
    {
        var cfg = new RunConfigOptions();
        var suite = new Option<string[]>("--suite") { Description = $"which figures: {string.Join(", ", Suites)} (default: all)", AllowMultipleArgumentsPerToken = true };
        suite.AcceptOnlyFromAmong(Suites);
        var json = new Option<string?>("--json") { Description = "also write the figures to this JSON file" };
        var benchSteps = RunConfigOptions.Positive("--bench-steps", "timed steps for throughput figures (default 30)");
        var cmd = new Command("bench", "measure tokens/s, MFU, tensor leaks (and, with a cluster, its overheads)");
        cfg.AddTo(cmd);
        cmd.Options.Add(suite);
        cmd.Options.Add(json);
        cmd.Options.Add(benchSteps);
        cmd.SetAction(p => Program.Guard(stderr, () =>
        {
            var chosen = p.GetValue(suite) is { Length: > 0 } s ? s : Suites;
            var config = cfg.Build(p);
            var corpus = TextCorpus.Load(config.Data.Path, config.Data.ValidationFraction, config.Model.Context);
            Training.TorchSetup.Configure(config);
            var figures = new List<BenchFigure>();
            int steps = p.GetValue(benchSteps) ?? 30;
            if (chosen.Contains("train"))
            {
                stdout.WriteLine($"train: {steps} timed steps of the configured model on {corpus.Name}, {TorchSharp.torch.get_num_threads()} threads ...");
                var r = TrainingBenchmarks.Throughput(config, corpus, steps);
                figures.Add(new("tokens/s (single process)", r.TokensPerSecond, "tok/s"));
                figures.Add(new("model FLOP/s", r.ModelFlops, "FLOP/s", "fp32 GEMM peak 1024^3", r.GemmPeakFlops));
                figures.Add(new("MFU", r.Mfu, "fraction"));
            }
            if (chosen.Contains("leak"))
            {
                stdout.WriteLine("leak: live tensors across 200 training steps (with evaluations) ...");
                var small = config with { Model = config.Model with { DModel = 64, Layers = 2, Context = 32, DenseHidden = 96, MoE = config.Model.MoE with { ExpertHidden = 32 } } };
                var r = TrainingBenchmarks.TensorLeak(small, corpus, 200);
                figures.Add(new("live tensors after 200 steps", r.LiveAfter, "tensors", "live tensors before", r.LiveBefore));
                figures.Add(new("working set after 200 steps", r.ProcessBytesAfter / 1048576.0, "MiB", "working set before", r.ProcessBytesBefore / 1048576.0));
            }
            Print(stdout, figures);
            if (p.GetValue(json) is { } path)
                File.WriteAllText(path, JsonSerializer.Serialize(figures.Select(f => new { f.Name, f.Value, f.Unit, f.Baseline, f.BaselineValue, f.Ratio }), new JsonSerializerOptions { WriteIndented = true }));
            return Program.ExitCodes.Ok;
        }));
        return cmd;
    }

    public static void Print(TextWriter o, IEnumerable<BenchFigure> figures)
    {
        o.WriteLine();
        o.WriteLine($"{"figure",-34} {"value",16} {"unit",-9} {"baseline (same run)",-28} {"baseline value",16} {"ratio",8}");
        foreach (var f in figures)
            o.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"{f.Name,-34} {Fmt(f.Value),16} {f.Unit,-9} {f.Baseline ?? "",-28} {(f.BaselineValue is { } b ? Fmt(b) : ""),16} {(f.Ratio is { } r ? r.ToString("F3", CultureInfo.InvariantCulture) : ""),8}"));
    }

    private static string Fmt(double v) => Math.Abs(v) >= 1e6 ? v.ToString("E3", CultureInfo.InvariantCulture) : v.ToString("F3", CultureInfo.InvariantCulture);
}
