using System.Globalization;
using System.Text;

namespace ElasticMoE.Training;

/// <summary>
/// Sees what a <see cref="TrainingReport"/> reports, as values rather than lines: the Prometheus metrics
/// (ElasticMoE.Runtime's <c>RunMetrics.Observer</c>) hook in here, so the single-process loop and the
/// coordinator feed them without knowing of them.
/// </summary>
/// <remarks>Called under the report's lock, in report order, so it must be quick and must not throw.</remarks>
public interface ITrainingObserver
{
    void Step(StepResult step, double? valLoss);

    /// <param name="recoverySeconds">From the change to the next committed step (NaN when unknown).</param>
    void MembershipEvent(string kind, string node, long step, double recoverySeconds);
}

/// <summary>
/// Where a run's progress goes: one human line per step on the console and, optionally, one JSON line
/// per step in a metrics file. Shared by the single-process loop and the distributed coordinator.
/// </summary>
/// <remarks>
/// Thread-safe, and a metrics line is whole or absent: each goes to the file in one unbuffered write,
/// so a process stopped by a signal (even killed between two steps) leaves only complete JSON lines,
/// and a line reported while the report is being disposed is dropped rather than torn.
/// </remarks>
public sealed class TrainingReport : IDisposable
{
    private static readonly UTF8Encoding Utf8 = new(encoderShouldEmitUTF8Identifier: false);   // no BOM: JSON-lines readers choke on it

    private readonly TextWriter _console;
    private readonly FileStream? _metrics;
    private readonly ITrainingObserver? _observer;
    private readonly object _gate = new();
    private bool _disposed;

    public TrainingReport(TextWriter console, string? metricsPath, ITrainingObserver? observer = null)
    {
        _console = console;
        _observer = observer;
        if (!string.IsNullOrEmpty(metricsPath))
        {
            var dir = Path.GetDirectoryName(Path.GetFullPath(metricsPath));
            if (dir is not null) Directory.CreateDirectory(dir);
            // bufferSize 0: every Write is one write(2) of a whole line, nothing left in a buffer to flush.
            _metrics = new FileStream(metricsPath, FileMode.Create, FileAccess.Write, FileShare.Read, bufferSize: 0);
        }
    }

    /// <summary>Raised after each step is reported, on the reporting thread (benchmarks sample resources here).</summary>
    public event Action<StepResult>? StepReported;

    /// <summary>The number (1-based, as printed) of the last step reported, 0 before the first.</summary>
    public long LastStep
    {
        get { lock (_gate) return _lastStep; }
    }

    private long _lastStep;

    public void Step(StepResult r, double? valLoss, long totalSteps)
    {
        lock (_gate)
        {
            WriteStep(r, valLoss, totalSteps);
            _observer?.Step(r, valLoss);
            _lastStep = r.Step + 1;
        }
        StepReported?.Invoke(r);
    }

    private void WriteStep(StepResult r, double? valLoss, long totalSteps)
    {
        var line = string.Create(CultureInfo.InvariantCulture,
            $"step {r.Step + 1,5}/{totalSteps}  loss {r.Loss:F4}  {(valLoss is { } v ? $"val {v:F4}  " : "")}lr {r.Lr:E2}  |g| {r.GradNorm:F3}  tok/s {r.TokensPerSecond,8:F0}  maxvio {r.MaxVio:F3}");
        _console.WriteLine(line);
        if (_metrics is null || _disposed) return;
        var sb = new StringBuilder(160);
        sb.Append(CultureInfo.InvariantCulture, $"{{\"step\":{r.Step + 1},\"loss\":{Num(r.Loss)}");
        if (valLoss is { } val) sb.Append(CultureInfo.InvariantCulture, $",\"val_loss\":{Num(val)}");
        sb.Append(CultureInfo.InvariantCulture, $",\"tokens_per_s\":{Num(r.TokensPerSecond)},\"max_vio\":{Num(r.MaxVio)},\"lr\":{Num(r.Lr)},\"grad_norm\":{Num(r.GradNorm)},\"seconds\":{Num(r.Seconds)}");
        sb.Append(",\"expert_counts\":[");
        sb.AppendJoin(',', r.ExpertCounts.Select(l => "[" + string.Join(',', l) + "]"));
        sb.Append("]}\n");
        _metrics.Write(Utf8.GetBytes(sb.ToString()));
    }

    /// <summary>
    /// A membership change, once the run has committed a step after it: one JSON line in the metrics
    /// (<c>{"event":"node-lost","node":"...","step":N,"recovery_s":S}</c>) and one line on the console.
    /// <paramref name="step"/> is the 1-based step that was in flight (or next) when it happened;
    /// <paramref name="recoverySeconds"/> runs from then to the next committed step.
    /// </summary>
    /// <param name="breakdown">Further figures for the line (e.g. detection time, install seconds); NaN ones are written as null.</param>
    public void MembershipEvent(string kind, string node, long step, double recoverySeconds, IReadOnlyDictionary<string, double>? breakdown = null)
    {
        lock (_gate)
        {
            _console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"{kind} {node} at step {step}: training again {recoverySeconds:F2} s later"));
            _observer?.MembershipEvent(kind, node, step, recoverySeconds);
            if (_metrics is null || _disposed) return;
            var json = System.Text.Json.JsonSerializer.Serialize(node);
            var extra = breakdown is null ? "" : string.Concat(breakdown.Select(kv => $",\"{kv.Key}\":{Num(kv.Value)}"));
            _metrics.Write(Utf8.GetBytes(string.Create(CultureInfo.InvariantCulture,
                $"{{\"event\":\"{kind}\",\"node\":{json},\"step\":{step},\"recovery_s\":{Num(recoverySeconds)}{extra}}}\n")));
        }
    }

    /// <summary>
    /// A rollback in place (every copy of some units was lost): before step <paramref name="fromStep"/> (1-based, the step
    /// in flight), back to the checkpoint of step <paramref name="toStep"/>; <paramref name="recoverySeconds"/> runs from
    /// the loss to the first step committed after it. One JSON line:
    /// <c>{"event":"rollback","step":S,"from_step":S,"to_step":C,"lost_units":[...],"recovery_s":R}</c>.
    /// </summary>
    public void RollbackEvent(long fromStep, long toStep, IReadOnlyList<string> lostUnits, double recoverySeconds)
    {
        lock (_gate)
        {
            _console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"rollback at step {fromStep} to the checkpoint of step {toStep} ({lostUnits.Count} unit(s) lost): training again {recoverySeconds:F2} s later"));
            if (_metrics is null || _disposed) return;
            var units = System.Text.Json.JsonSerializer.Serialize(lostUnits);
            _metrics.Write(Utf8.GetBytes(string.Create(CultureInfo.InvariantCulture,
                $"{{\"event\":\"rollback\",\"step\":{fromStep},\"from_step\":{fromStep},\"to_step\":{toStep},\"lost_units\":{units},\"recovery_s\":{Num(recoverySeconds)}}}\n")));
        }
    }

    /// <summary>
    /// An expert rebalance installed before step <paramref name="step"/>: the window's worker max/mean load
    /// before and as planned after, and the expert copies it moved.
    /// </summary>
    public void RebalanceEvent(long step, double maxOverMeanBefore, double maxOverMeanAfter, int copiesMoved)
    {
        lock (_gate)
        {
            _console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"rebalance at step {step}: max/mean {maxOverMeanBefore:F3} -> {maxOverMeanAfter:F3}, {copiesMoved} cop{(copiesMoved == 1 ? "y" : "ies")} moved"));
            if (_metrics is null || _disposed) return;
            _metrics.Write(Utf8.GetBytes(string.Create(CultureInfo.InvariantCulture,
                $"{{\"event\":\"rebalance\",\"step\":{step},\"max_over_mean_before\":{Num(maxOverMeanBefore)},\"after\":{Num(maxOverMeanAfter)},\"copies_moved\":{copiesMoved}}}\n")));
        }
    }

    public void Info(string message)
    {
        lock (_gate) _console.WriteLine(message);
    }

    private static string Num(double d) => double.IsFinite(d) ? d.ToString("R", CultureInfo.InvariantCulture) : "null";

    public void Dispose()
    {
        lock (_gate)
        {
            _disposed = true;
            _metrics?.Dispose();
        }
    }
}

/// <summary>Options of a training run that are about the process, not the model.</summary>
/// <param name="SavePath">Run directory to save checkpoints into (<see cref="Checkpointing.CheckpointStore"/>).</param>
/// <param name="ResumePath">Run directory to resume from: its newest committed checkpoint that verifies.</param>
/// <param name="Keep">Committed checkpoints kept in <paramref name="SavePath"/>; older ones are deleted after a newer commit.</param>
/// <param name="Observer">Also given each step (the Prometheus metrics, when this process serves them).</param>
public sealed record RunOptions(string? MetricsPath = null, string? SavePath = null, string? ResumePath = null, int SaveEvery = 0, int Keep = 2,
    ITrainingObserver? Observer = null);

/// <summary>Drives a <see cref="Trainer"/> to the end: progress, validation, time limit, saves.</summary>
public static class TrainingRun
{
    /// <param name="Stopped">The cancellation token ended the run before its last step (after a complete one).</param>
    public sealed record Summary(long Steps, double FirstLoss, double LastLoss, double? LastValLoss, double Seconds, double MeanTokensPerSecond, bool Stopped = false);

    /// <summary>
    /// Trains until the configured steps or time limit, or until <paramref name="cancel"/> is cancelled:
    /// then the step under way completes and is reported, the state is saved if a save path is set (so
    /// <c>--resume</c> continues from there), and the run ends with <see cref="Summary.Stopped"/> set.
    /// </summary>
    public static Summary Run(Trainer trainer, RunOptions options, TextWriter console, CancellationToken cancel = default)
    {
        var t = trainer.Config.Train;
        using var report = new TrainingReport(console, options.MetricsPath, options.Observer);
        if (options.ResumePath is { } resume)
        {
            foreach (var warning in trainer.Load(resume)) report.Info("warning: " + warning);
            report.Info($"resumed from {resume} at step {trainer.Step}");
        }
        report.Info($"training {trainer.Model.parameters().Sum(p => p.numel()):N0} parameters on {trainer.Sampler.Corpus.Name} " +
                    $"({trainer.Sampler.Corpus.TrainLength:N0} train / {trainer.Sampler.Corpus.ValidationLength:N0} validation {(trainer.Sampler.Corpus.Tokenizer is Data.ByteTokenizer ? "bytes" : trainer.Sampler.Corpus.Tokenizer.Name + " tokens")}), " +
                    $"device {trainer.Device}, {TorchSharp.torch.get_num_threads()} threads");
        var clock = System.Diagnostics.Stopwatch.StartNew();
        double first = double.NaN, last = double.NaN, tokens = 0, stepSeconds = 0;
        double? val = null;
        long done = 0, savedAt = -1;
        bool timedOut = false;
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
            {
                trainer.Save(save, options.Keep);
                savedAt = trainer.Step;
            }
            if (timeUp)
            {
                timedOut = true;
                report.Info($"time limit of {t.TimeLimitSeconds:F0} s reached after step {trainer.Step}");
                break;
            }
        }
        bool stopped = cancel.IsCancellationRequested && trainer.Step < t.Steps && !timedOut;
        if (stopped && options.SavePath is { } stopSave && savedAt != trainer.Step && done > 0)
        {
            trainer.Save(stopSave, options.Keep);
            report.Info($"saved {stopSave} at step {trainer.Step}");
        }
        var summary = new Summary(done, first, last, val, clock.Elapsed.TotalSeconds, stepSeconds > 0 ? tokens / stepSeconds : 0, stopped);
        report.Info(string.Create(CultureInfo.InvariantCulture,
            $"done: {done} steps in {summary.Seconds:F1} s, loss {first:F4} -> {last:F4} ({(last / first):P0} of first){(val is { } v ? $", validation {v:F4}" : "")}, {summary.MeanTokensPerSecond:F0} tokens/s"));
        return summary;
    }
}
