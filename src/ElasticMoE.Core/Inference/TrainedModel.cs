using ElasticMoE.Checkpointing;
using ElasticMoE.Data;
using ElasticMoE.Model;
using ElasticMoE.State;
using static TorchSharp.torch;

namespace ElasticMoE.Inference;

/// <summary>
/// A trained model loaded for inference: from a run directory (a cluster's <c>--run-dir</c> or a
/// <c>--save</c> directory: the same checkpoint format) or from an exported safetensors file.
/// </summary>
/// <remarks>
/// The architecture is read from the run fingerprint stored with the weights (<see cref="RunSettings"/>), so
/// nothing else is needed: not the HOCON, not the <c>--set</c>s of the training run.
/// </remarks>
public sealed class TrainedModel : IDisposable
{
    private TrainedModel(MoETransformer model, RunSettings run, long step, string source, IReadOnlyList<string> warnings)
    {
        Model = model;
        Run = run;
        Step = step;
        Source = source;
        Warnings = warnings;
        Tokenizer = Tokenizers.For(Tokenizers.NameOf(run.Model));
        model.eval();
    }

    public MoETransformer Model { get; }
    public RunSettings Run { get; }
    public ITokenizer Tokenizer { get; }

    /// <summary>Steps trained when the weights were taken.</summary>
    public long Step { get; }

    /// <summary>What was loaded, for messages: the checkpoint directory or the file.</summary>
    public string Source { get; }

    /// <summary>Warnings met while loading (a damaged newer checkpoint passed over, naming its bad files).</summary>
    public IReadOnlyList<string> Warnings { get; }

    /// <summary>
    /// Loads <paramref name="path"/>: a directory is a run directory (its newest checkpoint that verifies, or the one
    /// of <paramref name="step"/>), a file an exported model.
    /// </summary>
    /// <exception cref="FileNotFoundException">Nothing there, or no committed checkpoint (of that step).</exception>
    /// <exception cref="CheckpointCorruptException">Checkpoints were committed but none (not that one) verifies.</exception>
    /// <exception cref="InvalidDataException">A file that is not an exported model.</exception>
    public static TrainedModel Open(string path, long? step = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        if (Directory.Exists(path))
        {
            var store = new CheckpointStore(path);
            if (step is { } s) return FromCheckpoint(store.Load(s), []);
            var load = store.LoadNewestValid();
            if (load.Checkpoint is not { } checkpoint)
                throw new FileNotFoundException($"no committed checkpoint in {store.Root} (is it a run directory of `train --run-dir` or `--save`?)");
            return FromCheckpoint(checkpoint, load.Warnings);
        }
        if (File.Exists(path))
        {
            if (step is not null) throw new ArgumentException("--step picks a checkpoint of a run directory; an exported file holds one step");
            return FromExport(path);
        }
        throw new FileNotFoundException($"no run directory or exported model at {path}", path);
    }

    public static TrainedModel FromCheckpoint(VerifiedCheckpoint checkpoint, IReadOnlyList<string> warnings)
    {
        var run = RunSettings.Parse(checkpoint.Manifest.RunFingerprint);
        var model = new MoETransformer(run.Model, run.Seed);
        try
        {
            var units = UnitBinding.Bind(model);
            try
            {
                foreach (var (id, unit) in units)
                {
                    if (!checkpoint.UnitBlobs.TryGetValue(id, out var blob))
                        throw new InvalidDataException($"the checkpoint {checkpoint.Directory} lacks unit {id}");
                    unit.Import(blob);
                }
            }
            catch (UnitFormatException e)
            {
                throw new InvalidDataException($"the checkpoint {checkpoint.Directory} does not fit its own run fingerprint: {e.Message}");
            }
            finally
            {
                foreach (var unit in units.Values) unit.Dispose(); // frees the AdamW moments Import read: inference has no use for them
            }
            return new TrainedModel(model, run, checkpoint.Step, checkpoint.Directory, warnings);
        }
        catch
        {
            model.Dispose();
            throw;
        }
    }

    /// <summary>An exported model (<see cref="VerifiedCheckpoint.ExportModel"/>): every parameter and router bias by its name.</summary>
    public static TrainedModel FromExport(string path)
    {
        SafetensorsFile file;
        try
        {
            file = Safetensors.Read(File.ReadAllBytes(path));
        }
        catch (FormatException e)
        {
            throw new InvalidDataException($"{path} is not a safetensors file: {e.Message}");
        }
        if (file.Metadata.GetValueOrDefault("format") != VerifiedCheckpoint.ModelFormat || !file.Metadata.TryGetValue("run_fingerprint", out var fingerprint))
            throw new InvalidDataException($"{path} is not a model exported by `elasticmoe checkpoints export` (metadata format is not {VerifiedCheckpoint.ModelFormat})");
        var run = RunSettings.Parse(fingerprint);
        var model = new MoETransformer(run.Model, run.Seed);
        try
        {
            var targets = model.named_parameters().Select(p => (p.name, (Tensor)p.parameter))
                .Concat(model.named_buffers().Where(b => b.name.EndsWith(".expert_bias", StringComparison.Ordinal)))
                .ToList();
            var missing = targets.Select(t => t.Item1).Where(n => !file.Contains(n)).ToList();
            if (missing.Count > 0) throw new InvalidDataException($"{path} lacks {missing.Count} tensor(s) of its model: {string.Join(", ", missing.Take(5))}");
            using (no_grad())
                foreach (var (name, target) in targets)
                {
                    using var source = file.ToTensor(name);
                    if (!source.shape.SequenceEqual(target.shape) || source.dtype != target.dtype)
                        throw new InvalidDataException($"{path}: tensor {name} is {source.dtype}[{string.Join(", ", source.shape)}], the model's {target.dtype}[{string.Join(", ", target.shape)}]");
                    target.copy_(source);
                }
            long step = long.Parse(file.Metadata.GetValueOrDefault("step") ?? "0", System.Globalization.CultureInfo.InvariantCulture);
            return new TrainedModel(model, run, step, Path.GetFullPath(path), []);
        }
        catch
        {
            model.Dispose();
            throw;
        }
    }

    public void Dispose() => Model.Dispose();
}
