using ElasticMoE.Checkpointing;
using ElasticMoE.Configuration;
using ElasticMoE.Data;
using ElasticMoE.Model;
using ElasticMoE.State;
using TorchSharp;
using static TorchSharp.torch;

namespace ElasticMoE.Training;

/// <summary>Training stopped because the loss or the gradient stopped being a number.</summary>
public sealed class TrainingDivergedException(long step, string what, double value)
    : Exception($"training diverged at step {step}: {what} is {value}; nothing was updated or saved for this step")
{
    public long Step { get; } = step;
}

/// <summary>What one optimizer step did.</summary>
public sealed record StepResult(
    long Step,
    double Loss,
    double Lr,
    double GradNorm,
    double MaxVio,
    long[][] ExpertCounts,
    long Tokens,
    double Seconds)
{
    public double TokensPerSecond => Seconds > 0 ? Tokens / Seconds : 0;
}

/// <summary>
/// The single-process training loop: one model, every micro-batch of the global batch in turn,
/// gradient accumulation, global-norm clipping, AdamW, and the router-bias balancing update.
/// It is also the reference the distributed runtime must reproduce.
/// </summary>
public sealed class Trainer : IDisposable
{
    public ElasticMoEConfig Config { get; }
    public MoETransformer Model { get; }
    public AdamW Optimizer { get; }
    public BatchSampler Sampler { get; }
    public Device Device { get; }

    /// <summary>The next step to run (0-based); equals the number of steps done.</summary>
    public long Step { get; private set; }

    public Trainer(ElasticMoEConfig config, TextCorpus corpus)
    {
        Config = config;
        Device = TorchSetup.Configure(config);
        Model = new MoETransformer(config.Model, config.Seed, Device);
        var t = config.Train;
        Optimizer = new AdamW(t.Beta1, t.Beta2, t.AdamEps, t.WeightDecay);
        Sampler = new BatchSampler(corpus, config.Seed, config.Model.Context);
    }

    public long TokensPerStep => (long)Config.Train.GlobalBatch * Config.Model.Context;

    public StepResult TrainStep()
    {
        var t = Config.Train;
        var sw = System.Diagnostics.Stopwatch.StartNew();
        using var scope = NewDisposeScope();
        Model.train();
        Model.zero_grad();
        int microBatches = t.MicroBatchesPerStep;
        double lossSum = 0;
        // Gradients summed in the canonical tree over micro-batches, as every layout of the cluster sums them.
        using var gradients = new GradientTree(Model.parameters().ToList(), microBatches, 0, microBatches);
        for (int m = 0; m < microBatches; m++)
        {
            using var micro = NewDisposeScope();
            var (x, y) = Sampler.TrainBatch(Step, m * t.MicroBatch, t.MicroBatch, Device);
            var ce = MoETransformer.CrossEntropy(Model.forward(x), y);
            var total = Model.AuxLoss() is { } aux ? ce.Plus(aux) : ce;
            using var perMicro = (1.0 / microBatches).ToScalar();
            total.mul(perMicro).backward();
            gradients.Take(m);
            // In micro-batch order: the coordinator adds the stages' per-micro-batch losses in the same order.
            lossSum += ce.item<float>();
        }
        gradients.InstallRoot();
        double loss = lossSum / microBatches;
        if (!double.IsFinite(loss)) throw new TrainingDivergedException(Step, "the loss", loss);

        double sumSq = GradClip.CanonicalTotal(GradClip.SumsOfSquares(Model.named_parameters().Select(p => (p.name, (Tensor)p.parameter))));
        if (!double.IsFinite(sumSq)) throw new TrainingDivergedException(Step, "the gradient norm", Math.Sqrt(sumSq));
        double lr = LrSchedule.At(Step, t.Steps, t.Lr, t.MinLr, t.WarmupSteps);
        Optimizer.Step(Model.named_parameters().Select(p => (p.name, (Tensor)p.parameter)), lr, GradClip.Coefficient(sumSq, t.GradClip));

        var counts = Model.TakeExpertCounts();
        int layer = 0;
        foreach (var moe in Model.MoELayers)
            moe.Router.UpdateBias(counts[layer++], Config.Model.MoE.BiasUpdateRate);

        var result = new StepResult(Step, loss, lr, Math.Sqrt(sumSq), LoadBalance.MeanMaxVio(counts), counts, TokensPerStep, sw.Elapsed.TotalSeconds);
        Step++;
        return result;
    }

    /// <summary>Mean validation loss (nats/byte) over the fixed validation sequences.</summary>
    public double Evaluate()
    {
        var t = Config.Train;
        Model.eval();
        double sum = 0;
        using (no_grad())
        {
            for (int b = 0; b < t.EvalBatches; b++)
            {
                using var scope = NewDisposeScope();
                var (x, y) = Sampler.ValidationBatch(b * t.MicroBatch, t.MicroBatch, Device);
                sum += MoETransformer.CrossEntropy(Model.forward(x), y).item<float>();
            }
        }
        // Evaluation must not count towards the balancing loads of the next step.
        Model.TakeExpertCounts();
        Model.train();
        return sum / t.EvalBatches;
    }

    /// <summary>
    /// Saves the full training state as a checkpoint of <paramref name="runDirectory"/> (the format
    /// the cluster uses: <see cref="CheckpointStore"/>), keeping the newest <paramref name="keep"/>.
    /// </summary>
    public CheckpointCommit Save(string runDirectory, int keep = 2) => TrainingState.Save(this, new CheckpointStore(runDirectory, keep: keep));

    /// <summary>
    /// Continues from the newest committed checkpoint of <paramref name="runDirectory"/> that verifies;
    /// returns the warnings met (a damaged newer checkpoint passed over, naming its bad files).
    /// </summary>
    /// <exception cref="FileNotFoundException">No checkpoint was ever committed there.</exception>
    /// <exception cref="CheckpointCorruptException">Checkpoints were committed but none verifies; nothing was loaded.</exception>
    /// <exception cref="ConfigException">The checkpoint is of another model; nothing was loaded.</exception>
    public IReadOnlyList<string> Load(string runDirectory)
    {
        var load = new CheckpointStore(runDirectory).LoadNewestValid();
        if (load.Checkpoint is not { } checkpoint)
            throw new FileNotFoundException($"no committed checkpoint in {Path.GetFullPath(runDirectory)}", runDirectory);
        Step = TrainingState.Restore(checkpoint, Config, Model, Optimizer);
        return load.Warnings;
    }

    public void Dispose()
    {
        Optimizer.Dispose();
        Model.Dispose();
    }
}

/// <summary>Process-wide torch settings for a run: threads and device.</summary>
public static class TorchSetup
{
    /// <summary>
    /// Sets libtorch's intra-op threads for the calling thread. OpenMP keeps this per OS thread, so every
    /// thread that computes (the main loop, each compute actor's dedicated thread) must call it.
    /// </summary>
    public static void ApplyThreads(ElasticMoEConfig config)
    {
        int threads = config.Threads > 0 ? config.Threads : Environment.ProcessorCount;
        if (torch.get_num_threads() != threads) torch.set_num_threads(threads);
    }

    public static Device Configure(ElasticMoEConfig config)
    {
        Native.LibTorchLoader.EnsureLoaded();
        ApplyThreads(config);
        return ResolveDevice(config);
    }

    /// <summary>The configured device for the first worker (device index 0), checked; touches no thread settings.</summary>
    public static Device ResolveDevice(ElasticMoEConfig config) => ResolveDevice(config, 0);

    /// <summary>
    /// The device of the worker with <paramref name="deviceIndex"/> (0 .. cluster.devices - 1) on this node,
    /// checked; touches no thread settings. See <see cref="DeviceName"/> for the mapping.
    /// </summary>
    /// <exception cref="ConfigException">CUDA is asked for but not available, or the node has too few GPUs.</exception>
    public static Device ResolveDevice(ElasticMoEConfig config, int deviceIndex)
    {
        ArgumentNullException.ThrowIfNull(config);
        var name = DeviceName(config.Device, deviceIndex);
        Native.LibTorchLoader.EnsureLoaded();
        if (name == "cpu") return torch.device(name);
        var which = name == config.Device ? $"\"{name}\"" : $"\"{config.Device}\" (worker device {deviceIndex} -> {name})";
        // Checked before torch.device, which on a CPU-only libtorch fails with a message about backends.
        if (!torch.cuda.is_available())
            throw new ConfigException($"elasticmoe.device = {which} but CUDA is not available (build with -p:TorchBackend=cuda on a machine with a GPU)");
        var device = torch.device(name);
        var count = torch.cuda.device_count();
        if (device.index >= count)
            throw new ConfigException($"elasticmoe.device = {which} but this machine has {count} CUDA device(s): lower cluster.devices or the device number");
        return device;
    }

    /// <summary>
    /// Which torch device a node's worker <paramref name="deviceIndex"/> uses, from the configured
    /// <c>elasticmoe.device</c>: "cpu" is "cpu" for every worker; "cuda" is "cuda:<paramref name="deviceIndex"/>";
    /// "cuda:N" is "cuda:(N + <paramref name="deviceIndex"/>)". Pure string mapping, testable without a GPU.
    /// </summary>
    /// <remarks>
    /// Why an offset and not the same device for all: a node hosting several workers (cluster.devices &gt; 1)
    /// must put each on its own GPU, or they share one and the others idle. "cuda:N" lets two nodes on one
    /// machine split its GPUs (the second with "cuda:2", say). CPU workers share the cores instead; their
    /// split is elasticmoe.threads.
    /// </remarks>
    /// <exception cref="ConfigException">The device string is none of the three forms.</exception>
    public static string DeviceName(string configured, int deviceIndex)
    {
        ArgumentNullException.ThrowIfNull(configured);
        ArgumentOutOfRangeException.ThrowIfNegative(deviceIndex);
        if (configured == "cpu") return "cpu";
        if (configured == "cuda") return $"cuda:{deviceIndex}";
        const string prefix = "cuda:";
        if (configured.StartsWith(prefix, StringComparison.Ordinal)
            && int.TryParse(configured.AsSpan(prefix.Length), System.Globalization.NumberStyles.None,
                System.Globalization.CultureInfo.InvariantCulture, out var first)
            && (long)first + deviceIndex <= int.MaxValue)
            return $"cuda:{first + deviceIndex}";
        throw new ConfigException($"elasticmoe.device must be \"cpu\", \"cuda\" or \"cuda:N\", got \"{configured}\"");
    }
}

/// <summary>
/// Maps the single-process loop's training state to and from a checkpoint: the model cut into its
/// state units (<see cref="UnitBinding"/>), each carrying its parameters, router bias and the AdamW
/// moments the loop's optimizer keeps under the same names — one checkpoint format for the loop and
/// the cluster, so either can resume what the other saved.
/// </summary>
public static class TrainingState
{
    /// <summary>
    /// Copies the state to host memory and writes it as one committed checkpoint of step
    /// <see cref="Trainer.Step"/>. Every unit's applied step is Step − 1 (the last update applied), and
    /// the optimizer's update count equals Step in this loop, so neither needs a field of its own.
    /// </summary>
    public static CheckpointCommit Save(Trainer trainer, CheckpointStore store)
    {
        var blobs = new List<ReadOnlyMemory<byte>>();
        var units = UnitBinding.Bind(trainer.Model);
        try
        {
            foreach (var unit in units.Values)
            {
                unit.AppliedStep = trainer.Step - 1;
                // New handles on the optimizer's moment tensors (no copy): the unit owns and disposes
                // the handles, the optimizer keeps the tensors.
                foreach (var (name, _) in unit.Parameters)
                    if (trainer.Optimizer.Moments.TryGetValue(name, out var mv))
                        unit.MomentStore[name] = (mv.M.detach(), mv.V.detach());
                blobs.Add(unit.Export());
            }
        }
        finally
        {
            foreach (var unit in units.Values) unit.Dispose();
        }
        var layout = new Dictionary<string, string>(StringComparer.Ordinal) { ["mode"] = "single-process", ["workers"] = "1" };
        return store.Save(trainer.Step, RunFingerprint(trainer.Config, trainer.Sampler.Corpus.Fingerprint), Fingerprint(trainer.Config.Model), layout, blobs);
    }

    /// <summary>
    /// Loads a verified checkpoint into a model and optimizer built from <paramref name="config"/>;
    /// returns the step to continue at. All or nothing: the model must match and every unit's blob
    /// must pass every import check before the first tensor changes.
    /// </summary>
    /// <exception cref="ConfigException">The checkpoint is of another model.</exception>
    public static long Restore(VerifiedCheckpoint checkpoint, ElasticMoEConfig config, MoETransformer model, AdamW optimizer)
    {
        var fp = Fingerprint(config.Model);
        if (checkpoint.Manifest.Model != fp)
            throw new ConfigException($"the checkpoint's model ({checkpoint.Manifest.Model}) differs from the configured model ({fp})");
        var units = UnitBinding.Bind(model);
        try
        {
            if (!units.Keys.SequenceEqual(checkpoint.UnitBlobs.Keys))
                throw new ConfigException($"the checkpoint {checkpoint.Directory} holds units [{string.Join(", ", checkpoint.UnitBlobs.Keys)}], the model [{string.Join(", ", units.Keys)}]");
            try
            {
                foreach (var (id, unit) in units) unit.CheckImport(checkpoint.UnitBlobs[id]);
            }
            catch (UnitFormatException e)
            {
                throw new ConfigException($"the checkpoint {checkpoint.Directory} does not fit the configured model: {e.Message}");
            }
            foreach (var (id, unit) in units)
            {
                unit.Import(checkpoint.UnitBlobs[id]);
                // The moments move from the unit to the optimizer, which owns them from here on.
                foreach (var (name, (m, v)) in unit.MomentStore) optimizer.SetMoments(name, m, v);
                unit.MomentStore.Clear();
            }
        }
        finally
        {
            foreach (var unit in units.Values) unit.Dispose();
        }
        optimizer.StepCount = checkpoint.Step;
        return checkpoint.Step;
    }

    /// <summary>
    /// Everything that decides a run's curve, as <c>key=value</c> pairs joined by ';': every field of the
    /// model options (with the MoE options), every field of the train options, the seed, and
    /// <paramref name="dataFingerprint"/> (<see cref="TextCorpus.Fingerprint"/>). Equal strings, same run.
    /// </summary>
    /// <remarks>
    /// <para>
    /// Why: <see cref="Fingerprint(ModelOptions)"/> only says whether a checkpoint fits the architecture. A
    /// node that joins a run must also agree on the batch sizes, the schedule, the optimizer, the seed and
    /// the data, or it computes different gradients with no error at all. Nodes send this when they register
    /// and the coordinator refuses a node whose string differs (<see cref="RunFingerprintDifferences"/> says where).
    /// </para>
    /// <para>
    /// Readable rather than hashed, so a refusal can name the setting. The fields are read from the records'
    /// primary constructors, so a field added to <see cref="ModelOptions"/>, <see cref="MoEOptions"/> or
    /// <see cref="TrainOptions"/> is covered without anyone remembering to add it here. Numbers are written
    /// with invariant culture and round-trip precision. Cluster settings are left out: nodes legitimately
    /// differ in host, port and devices.
    /// </para>
    /// </remarks>
    public static string RunFingerprint(ElasticMoEConfig config, string dataFingerprint)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentException.ThrowIfNullOrWhiteSpace(dataFingerprint);
        var parts = new List<string>();
        AppendFields(parts, "model", config.Model);
        AppendFields(parts, "train", config.Train, CoordinatorOnly);
        parts.Add("seed=" + config.Seed.ToString(System.Globalization.CultureInfo.InvariantCulture));
        parts.Add("data=" + dataFingerprint);
        return string.Join(';', parts);
    }

    /// <summary>"key: a vs b" for each field in which two run fingerprints differ (empty when they are equal).</summary>
    public static IReadOnlyList<string> RunFingerprintDifferences(string a, string b)
    {
        static Dictionary<string, string> Fields(string f) => f.Split(';')
            .Select(p => p.Split('=', 2))
            .ToDictionary(kv => kv[0], kv => kv.Length > 1 ? kv[1] : "", StringComparer.Ordinal);
        var fa = Fields(a);
        var fb = Fields(b);
        return fa.Keys.Union(fb.Keys)
            .Where(k => fa.GetValueOrDefault(k) != fb.GetValueOrDefault(k))
            .Select(k => $"{k}: {fa.GetValueOrDefault(k) ?? "(none)"} vs {fb.GetValueOrDefault(k) ?? "(none)"}")
            .ToList();
    }

    /// <summary>
    /// Train options that only the coordinator reads (it sends the step's learning rate and clip scale,
    /// and decides when to evaluate and stop): nodes never compute with them, so a node started with
    /// other values, or none, computes the same gradients and is welcome.
    /// </summary>
    public static readonly IReadOnlySet<string> CoordinatorOnly = new HashSet<string>(StringComparer.Ordinal)
    {
        nameof(TrainOptions.Steps), nameof(TrainOptions.Lr), nameof(TrainOptions.MinLr), nameof(TrainOptions.WarmupSteps),
        nameof(TrainOptions.GradClip), nameof(TrainOptions.EvalEvery), nameof(TrainOptions.TimeLimitSeconds),
    };

    // One "prefix.Field=value" per parameter of the record's primary constructor; nested option records recurse.
    private static void AppendFields(List<string> parts, string prefix, object record, IReadOnlySet<string>? skip = null)
    {
        var type = record.GetType();
        var ctor = type.GetConstructors().Single(c => !(c.GetParameters() is [var only] && only.ParameterType == type));
        foreach (var parameter in ctor.GetParameters())
        {
            if (skip?.Contains(parameter.Name!) == true) continue;
            var value = type.GetProperty(parameter.Name!)!.GetValue(record);
            var key = $"{prefix}.{parameter.Name}";
            switch (value)
            {
                case MoEOptions nested: AppendFields(parts, key, nested); break;
                case double d: parts.Add($"{key}={d.ToString("R", System.Globalization.CultureInfo.InvariantCulture)}"); break;
                case IFormattable f: parts.Add($"{key}={f.ToString(null, System.Globalization.CultureInfo.InvariantCulture)}"); break;
                default: parts.Add($"{key}={value}"); break;
            }
        }
    }

    /// <summary>A string identifying the model's shape: states only load into the same architecture.</summary>
    /// <remarks>MHA's string is the one of before MLA existed, so checkpoints written then still load.</remarks>
    public static string Fingerprint(ModelOptions m)
        => $"d{m.DModel}-L{m.Layers}-H{m.Heads}-T{m.Context}-dense{m.DenseLayers}x{m.DenseHidden}-E{m.MoE.RoutedExperts}k{m.MoE.TopK}s{m.MoE.SharedExperts}h{m.MoE.ExpertHidden}-{m.MoE.Scoring}"
           + (m.Attention == AttentionKind.Mla ? $"-mla-q{m.QLoraRank}-kv{m.KvLoraRank}-n{m.QkNopeHeadDim}-r{m.QkRopeHeadDim}-v{m.VHeadDim}" : "");
}
