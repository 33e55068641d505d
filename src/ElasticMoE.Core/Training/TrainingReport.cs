using System.Globalization;
using System.Text;

namespace ElasticMoE.Training;

/// <summary>
/// Where a run's progress goes: one human line per step on the console and, optionally, one JSON line
/// per step in a metrics file. Shared by the single-process loop and the distributed coordinator.
/// </summary>
public sealed class TrainingReport : IDisposable
{
    private readonly TextWriter _console;
    private readonly StreamWriter? _metrics;

    public TrainingReport(TextWriter console, string? metricsPath)
    {
        _console = console;
        if (!string.IsNullOrEmpty(metricsPath))
        {
            var dir = Path.GetDirectoryName(Path.GetFullPath(metricsPath));
            if (dir is not null) Directory.CreateDirectory(dir);
            _metrics = new StreamWriter(metricsPath, append: false, new UTF8Encoding(encoderShouldEmitUTF8Identifier: false)) { AutoFlush = true };   // no BOM: JSON-lines readers choke on it
        }
    }

    /// <summary>Raised after each step is reported, on the reporting thread (benchmarks sample resources here).</summary>
    public event Action<StepResult>? StepReported;

    public void Step(StepResult r, double? valLoss, long totalSteps)
    {
        WriteStep(r, valLoss, totalSteps);
        StepReported?.Invoke(r);
    }

    private void WriteStep(StepResult r, double? valLoss, long totalSteps)
    {
        var line = string.Create(CultureInfo.InvariantCulture,
            $"step {r.Step + 1,5}/{totalSteps}  loss {r.Loss:F4}  {(valLoss is { } v ? $"val {v:F4}  " : "")}lr {r.Lr:E2}  |g| {r.GradNorm:F3}  tok/s {r.TokensPerSecond,8:F0}  maxvio {r.MaxVio:F3}");
        _console.WriteLine(line);
        if (_metrics is null) return;
        var sb = new StringBuilder(160);
        sb.Append(CultureInfo.InvariantCulture, $"{{\"step\":{r.Step + 1},\"loss\":{Num(r.Loss)}");
        if (valLoss is { } val) sb.Append(CultureInfo.InvariantCulture, $",\"val_loss\":{Num(val)}");
        sb.Append(CultureInfo.InvariantCulture, $",\"tokens_per_s\":{Num(r.TokensPerSecond)},\"max_vio\":{Num(r.MaxVio)},\"lr\":{Num(r.Lr)},\"grad_norm\":{Num(r.GradNorm)},\"seconds\":{Num(r.Seconds)}");
        sb.Append(",\"expert_counts\":[");
        sb.AppendJoin(',', r.ExpertCounts.Select(l => "[" + string.Join(',', l) + "]"));
        sb.Append("]}");
        _metrics.WriteLine(sb.ToString());
    }

    public void Info(string message) => _console.WriteLine(message);

    private static string Num(double d) => double.IsFinite(d) ? d.ToString("R", CultureInfo.InvariantCulture) : "null";

    public void Dispose() => _metrics?.Dispose();
}

/// <summary>Options of a training run that are about the process, not the model.</summary>
public sealed record RunOptions(string? MetricsPath = null, string? SavePath = null, string? ResumePath = null, int SaveEvery = 0);

/// <summary>Drives a <see cref="Trainer"/> to the end: progress, validation, time limit, saves.</summary>
public static class TrainingRun
{
    public sealed record Summary(long Steps, double FirstLoss, double LastLoss, double? LastValLoss, double Seconds, double MeanTokensPerSecond);

    public static Summary Run(Trainer trainer, RunOptions options, TextWriter console, CancellationToken cancel = default)
    {
        var t = trainer.Config.Train;
        using var report = new TrainingReport(console, options.MetricsPath);
        if (options.ResumePath is { } resume)
        {
            trainer.Load(resume);
            report.Info($"resumed from {resume} at step {trainer.Step}");
        }
        report.Info($"training {trainer.Model.parameters().Sum(p => p.numel()):N0} parameters on {trainer.Sampler.Corpus.Name} " +
                    $"({trainer.Sampler.Corpus.Train.Length:N0} train / {trainer.Sampler.Corpus.Validation.Length:N0} validation bytes), " +
                    $"device {trainer.Device}, {TorchSharp.torch.get_num_threads()} threads");
        var clock = System.Diagnostics.Stopwatch.StartNew();
        double first = double.NaN, last = double.NaN, tokens = 0, stepSeconds = 0;
        double? val = null;
        long done = 0;
        while (trainer.Step < t.Steps && !cancel.IsCancellationRequested)
        {
            var r = trainer.TrainStep();
            if (double.IsNaN(first)) first = r.Loss;
            last = r.Loss;
            tokens += r.Tokens;
            stepSeconds += r.Seconds;
            done++;
            bool timeUp = t.TimeLimitSeconds > 0 && clock.Elapsed.TotalSeconds >= t.TimeLimitSeconds;
            bool lastStep = trainer.Step >= t.Steps || timeUp;
            double? stepVal = null;
            if (trainer.Step % t.EvalEvery == 0 || lastStep) val = stepVal = trainer.Evaluate();
            report.Step(r, stepVal, t.Steps);
            if (options.SavePath is { } save && (lastStep || (options.SaveEvery > 0 && trainer.Step % options.SaveEvery == 0)))
                trainer.Save(save);
            if (timeUp)
            {
                report.Info($"time limit of {t.TimeLimitSeconds:F0} s reached after step {trainer.Step}");
                break;
            }
        }
        var summary = new Summary(done, first, last, val, clock.Elapsed.TotalSeconds, stepSeconds > 0 ? tokens / stepSeconds : 0);
        report.Info(string.Create(CultureInfo.InvariantCulture,
            $"done: {done} steps in {summary.Seconds:F1} s, loss {first:F4} -> {last:F4} ({(last / first):P0} of first){(val is { } v ? $", validation {v:F4}" : "")}, {summary.MeanTokensPerSecond:F0} tokens/s"));
        return summary;
    }
}
