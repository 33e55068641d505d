using Akka.Configuration;

namespace ElasticMoE.Configuration;

/// <summary>Raised for any configuration problem; the message names the key and, where known, the file.</summary>
public sealed class ConfigException(string message) : Exception(message);

public sealed record MoEOptions(
    int SharedExperts,
    int RoutedExperts,
    int TopK,
    int ExpertHidden,
    RouterScoring Scoring,
    double RouteScale,
    double BiasUpdateRate,
    double SequenceAuxAlpha,
    double CapacityFactor);

public enum RouterScoring { Sigmoid, Softmax }

/// <summary>The attention of every block (<c>model.attention</c>).</summary>
public enum AttentionKind
{
    /// <summary>Multi-head attention: per-head keys and values from one [q; k; v] projection, RoPE on every head.</summary>
    Mha,
    /// <summary>DeepSeek-V2/V3 multi-head latent attention: keys and values rebuilt from a joint latent (<c>model.mla.*</c>).</summary>
    Mla,
}

/// <param name="Attention"><c>model.attention</c>: multi-head (the default) or multi-head latent attention.</param>
/// <param name="QLoraRank"><c>model.mla.q-lora-rank</c>: the query's latent width; 0 = no query compression (a plain W_Q).</param>
/// <param name="KvLoraRank"><c>model.mla.kv-lora-rank</c>: the joint key-value latent c_KV, what the inference cache keeps per token.</param>
/// <param name="QkNopeHeadDim"><c>model.mla.qk-nope-head-dim</c>: per head, the query/key part without position (rebuilt from c_KV).</param>
/// <param name="QkRopeHeadDim"><c>model.mla.qk-rope-head-dim</c>: per head, the query part with RoPE; its key is one decoupled key shared by all heads.</param>
/// <param name="VHeadDim"><c>model.mla.v-head-dim</c>: per head, the value width.</param>
/// <param name="Tokenizer">
/// The tokenizer (<c>data.tokenizer</c>): bytes, gpt2, cl100k or o200k. Part of the model because its ids are the
/// rows of the embedding and the head, and so of the run fingerprint: a node with another tokenizer is refused, naming it.
/// </param>
public sealed record ModelOptions(
    int VocabSize,
    int DModel,
    int Layers,
    int Heads,
    int Context,
    double RopeTheta,
    double NormEps,
    int DenseLayers,
    int DenseHidden,
    MoEOptions MoE,
    string Tokenizer = "bytes",
    AttentionKind Attention = AttentionKind.Mha,
    int QLoraRank = 0,
    int KvLoraRank = 64,
    int QkNopeHeadDim = 32,
    int QkRopeHeadDim = 16,
    int VHeadDim = 32)
{
    public int HeadDim => DModel / Heads;

    /// <summary>Width of the RoPE tables: a whole head under MHA, the decoupled RoPE part under MLA.</summary>
    public int RopeDim => Attention == AttentionKind.Mla ? QkRopeHeadDim : HeadDim;

    /// <summary>
    /// Elements of one layer's inference cache per token: MHA keeps every head's key and value (2 × heads × head-dim),
    /// MLA the latent and the shared RoPE key (kv-lora-rank + qk-rope-head-dim).
    /// </summary>
    public int KvElementsPerToken => Attention == AttentionKind.Mla ? KvLoraRank + QkRopeHeadDim : 2 * Heads * HeadDim;
    public bool IsMoELayer(int layer) => layer >= DenseLayers;
}

public sealed record DataOptions(string Path, double ValidationFraction);

public sealed record TrainOptions(
    int Steps,
    int GlobalBatch,
    int MicroBatch,
    double Lr,
    double MinLr,
    int WarmupSteps,
    double WeightDecay,
    double Beta1,
    double Beta2,
    double AdamEps,
    double GradClip,
    int EvalEvery,
    int EvalBatches,
    double TimeLimitSeconds)
{
    public int MicroBatchesPerStep => GlobalBatch / MicroBatch;
}

/// <param name="PlanTimeoutSeconds">How long a re-plan's unit transfer (parameters and optimizer state moving to their new owners) may take.</param>
/// <param name="EvalTimeoutSeconds">How long a validation pass may take; longer than a step because it runs every validation batch.</param>
/// <param name="FinishTimeoutSeconds">How long the end of a run (final state, goodbyes) may take before nodes are left behind.</param>
/// <param name="Relayout">
/// A schedule of planned layout changes such as <c>"10=4x2,20=4x4"</c>; "" = none. Kept as the string here:
/// the runtime that applies it parses it.
/// </param>
/// <param name="FaultInjection">
/// A fault to inject for testing recovery, such as <c>"step=5,phase=backward,attempt=0"</c>; "" = none.
/// Kept as the string here and parsed where it is injected.
/// </param>
/// <param name="JoinSettleSeconds">After a node joins a running job, how long no further node must join before the
/// re-plan that includes them (at most 4 times this after the first), so that nodes arriving together are planned
/// together (one pause, not one each).</param>
/// <param name="MaxWaitSeconds">How long a run waits for workers when the layout it needs has more workers than
/// are present (paused, with a status line), before it fails with that reason.</param>
/// <param name="MinNodes">Fewest nodes a run goes on with after losing some: below it, it pauses until nodes join
/// (and fails after <c>cluster.max-wait</c>).</param>
/// <param name="WorkerRestarts">How often a stage, shard or mirror keeper that fails is re-created in place within a
/// minute before its worker leaves the plan (the node carries on).</param>
/// <param name="CoordinatorWaitSeconds">How long a node whose coordinator was lost keeps its units in memory and waits
/// for a coordinator at its seed nodes to adopt them (a restarted <c>elasticmoe train --run-dir</c>) before it
/// stops; 0 = stop at once.</param>
/// <param name="Redundancy">Mirrors r of every unit not yet on r + 1 nodes, kept on r workers of other nodes (and other
/// failure domains when there are enough) at the unit's own step, so any r nodes lost at once lose nothing; 1 is the
/// default, 0 = none.</param>
public sealed record ClusterOptions(
    string Host,
    int Port,
    IReadOnlyList<string> SeedNodes,
    int Devices,
    int Nodes,
    int ExpectedNodes,
    int PipelineStages,
    int ChecksumEvery,
    double StepTimeoutSeconds,
    int MaxFrameMb,
    bool CompressGradients,
    double PlanTimeoutSeconds,
    double EvalTimeoutSeconds,
    double FinishTimeoutSeconds,
    string Relayout,
    string FaultInjection,
    double JoinSettleSeconds,
    double MaxWaitSeconds,
    int Redundancy = 1,
    int WorkerRestarts = 3,
    int MinNodes = 1,
    double CoordinatorWaitSeconds = 60)
{
    /// <summary>Nodes the coordinator waits for: explicit, else the in-process ones.</summary>
    public int NodesToWaitFor => ExpectedNodes > 0 ? ExpectedNodes : Nodes;

    /// <summary><c>cluster.public-host</c>: what peers dial to reach this process (NAT, containers); "" = <see cref="Host"/>.
    /// <see cref="Host"/> is then only what it binds (e.g. "0.0.0.0").</summary>
    public string PublicHost { get; init; } = "";

    /// <summary><c>cluster.leave-settle</c>: after a node asks to leave (SIGTERM, a preemption notice), how long no further
    /// node must ask before the leavers are planned out together (at most 4x that after the first, and never past a
    /// third of the shortest notice), so nodes reclaimed together cost one re-plan.</summary>
    public double LeaveSettleSeconds { get; init; } = 0.25;

    /// <summary>
    /// <c>cluster.failure-domain</c>: what this node fails together with (a rack, a zone); null (configured as "") =
    /// the node alone. Mirrors of a unit go to distinct domains when the cluster has enough of them.
    /// </summary>
    public string? FailureDomain { get; init; }

    /// <summary>The host peers are told to dial: <see cref="PublicHost"/>, else <see cref="Host"/>.</summary>
    public string AdvertisedHost => PublicHost.Length > 0 ? PublicHost : Host;
}

/// <summary>Checkpoints of a cluster run with a run directory (<c>checkpoint.*</c>).</summary>
/// <param name="Every">Steps between checkpoints (0 = none but the last step's).</param>
/// <param name="EverySeconds">Also checkpoint once this many seconds passed since the last one (0 = off).</param>
/// <param name="Keep">Committed checkpoints kept; an older one is deleted only after a newer one is committed.</param>
public sealed record CheckpointOptions(int Every, double EverySeconds, int Keep)
{
    public static CheckpointOptions Default { get; } = new(50, 0, 2);
}

/// <summary>
/// How a silent node is found (<c>cluster.failure-detection.*</c>): Akka's failure detector suspects it, a probe confirms.
/// </summary>
/// <param name="HeartbeatInterval">Seconds between the cluster's heartbeats to each monitored member.</param>
/// <param name="AcceptablePause">Seconds of missed heartbeats tolerated before a member is suspected (unreachable).</param>
/// <param name="ProbeTimeout">Seconds a confirmation probe (TCP connects to the suspect's remoting port) waits for an
/// answer; no answer in time = lost. Set from the network's round trips: a LAN answers in well under a millisecond.</param>
/// <param name="ProbeInterval">Seconds between further probes of a suspect that answered (busy, not gone).</param>
/// <param name="StepOverdue">A step taking this many times the recent median step gets its nodes probed (0 = off).</param>
public sealed record FailureDetectionOptions(double HeartbeatInterval, double AcceptablePause, double ProbeTimeout, double ProbeInterval, double StepOverdue)
{
    public static FailureDetectionOptions Default { get; } = new(0.25, 1.0, 0.5, 0.5, 2.0);
}

/// <summary>The per-process Prometheus endpoint (<c>metrics.prometheus.*</c>): <c>http://HOST:PORT/metrics</c>.</summary>
/// <param name="Port">0 = no endpoint (the default): nothing listens.</param>
/// <param name="Host">What it listens on: loopback by default, so a run exposes nothing beyond this machine unless
/// told to; <c>0.0.0.0</c> (or <c>::</c>) = every interface.</param>
public sealed record PrometheusOptions(int Port, string Host)
{
    public static PrometheusOptions Default { get; } = new(0, "127.0.0.1");
}

/// <summary>
/// Load-based expert rebalancing (<c>rebalance.*</c>): when to re-place routed experts by their token loads, and how
/// many copies a placement may have and move.
/// </summary>
/// <param name="Every">Steps between checks of the load window (a rebalance runs at a check that finds max/mean above the
/// threshold); 0 = no automatic rebalances (the default), only requested ones.</param>
/// <param name="RedundantSlots">Copies a worker may hold per MoE layer beyond its even share: a worker has
/// <see cref="SlotsPerWorker"/> = ⌊experts / workers⌋ + this many slots per layer, used for redundant copies of hot
/// experts (and for the ⌈E/W⌉-th expert where W does not divide E). 64 experts on 8 workers with 2 give 10 slots, 25 % spare.</param>
/// <param name="ChurnBudget">Most copies one rebalance may move (a copy is moved when a worker gets an expert it did not
/// hold): below 1 a fraction of the copies in place (rounded down, at least 1), from 1 up a whole number of copies.</param>
/// <param name="Window">Steps of load history a rebalance plans for: the tokens each expert got over the last
/// <c>window</c> steps, summed (a sliding window, not an EMA: a step's counts weigh the same until they drop out).</param>
/// <param name="Threshold">Worker max/mean load over the window above which a rebalance is triggered.</param>
/// <param name="Hysteresis">A rebalance that could not get max/mean below the threshold raises the bar for the next one to
/// what it left plus this, so it is not repeated at every check; the bar drops back once max/mean is at or below
/// threshold − hysteresis (see <c>Planning.RebalanceTrigger</c>).</param>
public sealed record RebalanceOptions(int Every, int RedundantSlots, double ChurnBudget, int Window, double Threshold, double Hysteresis)
{
    public static RebalanceOptions Default { get; } = new(0, 1, 0.1, 20, 1.10, 0.05);

    /// <summary>Copies a worker may hold per MoE layer, with <paramref name="experts"/> routed experts on <paramref name="workers"/> workers.</summary>
    public int SlotsPerWorker(int experts, int workers) => experts / workers + RedundantSlots;

    /// <summary><see cref="ChurnBudget"/> as a number of copies, when <paramref name="copies"/> copies are in place.</summary>
    public int CopiesPerRebalance(int copies) => ChurnBudget < 1 ? Math.Max(1, (int)(ChurnBudget * copies)) : (int)ChurnBudget;

    /// <summary>
    /// Checks that a layout of <paramref name="experts"/> experts per layer on <paramref name="workers"/> workers has a slot
    /// for every expert; the runtime calls it when it knows the layout (the config alone does not).
    /// </summary>
    /// <exception cref="ConfigException">Too few slots, naming <c>rebalance.redundant-slots</c>.</exception>
    public void Validate(int experts, int workers)
    {
        if ((long)SlotsPerWorker(experts, workers) * workers < experts)
            throw new ConfigException(
                $"elasticmoe.rebalance.redundant-slots: {experts} experts per layer on {workers} workers need at least " +
                $"{(experts % workers + workers - 1) / workers} redundant slot(s) per worker ({experts / workers} + redundant-slots each), got {RedundantSlots}");
    }
}

/// <summary>The whole typed configuration of a run. With the seed it defines the run.</summary>
public sealed record ElasticMoEConfig(
    long Seed,
    string Device,
    int Threads,
    ModelOptions Model,
    DataOptions Data,
    TrainOptions Train,
    ClusterOptions Cluster,
    Akka.Configuration.Config Raw)
{
    /// <summary>When a cluster run with a run directory checkpoints, and how many it keeps.</summary>
    public CheckpointOptions Checkpoint { get; init; } = CheckpointOptions.Default;

    /// <summary>Where this process serves its metrics to Prometheus, if anywhere.</summary>
    public PrometheusOptions Prometheus { get; init; } = PrometheusOptions.Default;

    /// <summary><c>cluster.failure-detection.*</c>: suspicion by heartbeats, confirmation by probes.</summary>
    public FailureDetectionOptions FailureDetection { get; init; } = FailureDetectionOptions.Default;

    /// <summary>When and how routed experts are re-placed by load.</summary>
    public RebalanceOptions Rebalance { get; init; } = RebalanceOptions.Default;

    /// <summary>
    /// The run directory of a cluster run (<c>--run-dir</c>): the coordinator's journal and the checkpoints
    /// live there, and a coordinator started on an existing one resumes that run. Null: nothing persists.
    /// Given on the command line, not in HOCON: it names where this run is, not how it trains.
    /// </summary>
    public string? RunDirectory { get; init; }

    /// <summary>Reads the typed settings from a HOCON tree that has an <c>elasticmoe</c> section.</summary>
    public static ElasticMoEConfig FromHocon(Akka.Configuration.Config root)
    {
        if (!root.HasPath("elasticmoe")) throw new ConfigException("missing section 'elasticmoe'");
        var r = new Reader(root);
        var moe = new MoEOptions(
            r.Int("model.moe.shared-experts"), r.Int("model.moe.routed-experts"), r.Int("model.moe.top-k"),
            r.Int("model.moe.expert-hidden"), ParseScoring(r.String("model.moe.scoring")), r.Double("model.moe.route-scale"),
            r.Double("model.moe.bias-update-rate"), r.Double("model.moe.sequence-aux-alpha"), r.Double("model.moe.capacity-factor"));
        var tokenizer = r.String("data.tokenizer");
        var model = new ModelOptions(
            VocabSizeFor(r.Int("model.vocab-size"), tokenizer), r.Int("model.d-model"), r.Int("model.layers"), r.Int("model.heads"), r.Int("model.context"),
            r.Double("model.rope-theta"), r.Double("model.norm-eps"), r.Int("model.dense-layers"), r.Int("model.dense-hidden"), moe, tokenizer,
            ParseAttention(r.String("model.attention")), r.Int("model.mla.q-lora-rank"), r.Int("model.mla.kv-lora-rank"),
            r.Int("model.mla.qk-nope-head-dim"), r.Int("model.mla.qk-rope-head-dim"), r.Int("model.mla.v-head-dim"));
        var data = new DataOptions(r.String("data.path"), r.Double("data.validation-fraction"));
        var train = new TrainOptions(
            r.Int("train.steps"), r.Int("train.global-batch"), r.Int("train.micro-batch"), r.Double("train.lr"), r.Double("train.min-lr"),
            r.Int("train.warmup-steps"), r.Double("train.weight-decay"), r.Double("train.beta1"), r.Double("train.beta2"),
            r.Double("train.adam-eps"), r.Double("train.grad-clip"), r.Int("train.eval-every"), r.Int("train.eval-batches"),
            r.Double("train.time-limit"));
        var cluster = new ClusterOptions(
            r.String("cluster.host"), r.Int("cluster.port"), r.StringList("cluster.seed-nodes"), r.Int("cluster.devices"),
            r.Int("cluster.nodes"), r.Int("cluster.expected-nodes"), r.Int("cluster.pipeline-stages"), r.Int("cluster.checksum-every"),
            r.Double("cluster.step-timeout"), r.Int("cluster.max-frame-mb"), r.Bool("cluster.compress-gradients"),
            r.Double("cluster.plan-timeout"), r.Double("cluster.eval-timeout"), r.Double("cluster.finish-timeout"),
            r.String("cluster.relayout"), r.String("cluster.fault-injection"),
            r.Double("cluster.join-settle"), r.Double("cluster.max-wait"),
            r.Int("cluster.redundancy"), r.Int("cluster.worker-restarts"), r.Int("cluster.min-nodes"),
            r.Double("cluster.coordinator-wait"))
        {
            PublicHost = r.String("cluster.public-host"),
            LeaveSettleSeconds = r.Double("cluster.leave-settle"),
            FailureDomain = r.String("cluster.failure-domain") is { Length: > 0 } domain ? domain : null,
        };
        var cfg = new ElasticMoEConfig(r.Long("seed"), r.String("device"), r.Int("threads"), model, data, train, cluster, root)
        {
            Checkpoint = new CheckpointOptions(r.Int("checkpoint.every"), r.Double("checkpoint.every-seconds"), r.Int("checkpoint.keep")),
            Prometheus = new PrometheusOptions(r.Int("metrics.prometheus.port"), r.String("metrics.prometheus.host")),
            FailureDetection = new FailureDetectionOptions(r.Double("cluster.failure-detection.heartbeat-interval"),
                r.Double("cluster.failure-detection.acceptable-pause"), r.Double("cluster.failure-detection.probe-timeout"),
                r.Double("cluster.failure-detection.probe-interval"), r.Double("cluster.failure-detection.step-overdue")),
            Rebalance = new RebalanceOptions(r.Int("rebalance.every"), r.Int("rebalance.redundant-slots"), r.Double("rebalance.churn-budget"),
                r.Int("rebalance.window"), r.Double("rebalance.threshold"), r.Double("rebalance.hysteresis")),
        };
        cfg.Validate();
        return cfg;
    }

    /// <summary><c>model.vocab-size</c>: 0 is the tokenizer's vocabulary; another value must hold it (a larger one pads the embedding and head).</summary>
    private static int VocabSizeFor(int configured, string tokenizer)
    {
        int vocab;
        try
        {
            vocab = global::ElasticMoE.Data.Tokenizers.VocabSizeOf(tokenizer);
        }
        catch (ArgumentException e)
        {
            throw new ConfigException($"elasticmoe.data.tokenizer: {e.Message}");
        }
        if (configured == 0) return vocab;
        if (configured < vocab)
            throw new ConfigException($"elasticmoe.model.vocab-size: the {tokenizer} tokenizer has {vocab} tokens, so it must be 0 (the tokenizer's) or at least {vocab}, got {configured}");
        return configured;
    }

    /// <summary>Typed reads that turn a wrongly typed value into an error naming its key.</summary>
    private sealed class Reader(Akka.Configuration.Config root)
    {
        private T Get<T>(string key, Func<string, T> read, string type)
        {
            var path = "elasticmoe." + key;
            if (!root.HasPath(path)) throw new ConfigException($"missing config key '{path}'");
            try { return read(path); }
            catch (Exception ex) when (ex is not ConfigException)
            {
                throw new ConfigException($"config key '{path}' must be {type}, got '{root.GetValue(path)}'");
            }
        }
        public int Int(string key) => Get(key, p => checked((int)long.Parse(root.GetString(p), System.Globalization.CultureInfo.InvariantCulture)), "an integer");
        public long Long(string key) => Get(key, p => long.Parse(root.GetString(p), System.Globalization.CultureInfo.InvariantCulture), "an integer");
        public double Double(string key) => Get(key, p =>
        {
            var v = double.Parse(root.GetString(p), System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture);
            return double.IsFinite(v) ? v : throw new FormatException();
        }, "a finite number");
        public bool Bool(string key) => Get(key, p => root.GetString(p) switch
        {
            "true" or "on" or "yes" => true,
            "false" or "off" or "no" => false,
            _ => throw new FormatException(),
        }, "true or false");
        public string String(string key) => Get(key, p => root.GetString(p) ?? "", "a string");
        public IReadOnlyList<string> StringList(string key) => Get(key, p => (IReadOnlyList<string>)root.GetStringList(p).ToArray(), "a list of strings");
    }

    private static RouterScoring ParseScoring(string? s) => s?.ToLowerInvariant() switch
    {
        "sigmoid" => RouterScoring.Sigmoid,
        "softmax" => RouterScoring.Softmax,
        _ => throw new ConfigException($"elasticmoe.model.moe.scoring must be \"sigmoid\" or \"softmax\", got \"{s}\""),
    };

    private static AttentionKind ParseAttention(string? s) => s?.ToLowerInvariant() switch
    {
        "mha" => AttentionKind.Mha,
        "mla" => AttentionKind.Mla,
        _ => throw new ConfigException($"elasticmoe.model.attention must be \"mha\" (multi-head) or \"mla\" (multi-head latent), got \"{s}\""),
    };

    /// <summary>
    /// Limits set by how data-plane tags are packed (see <c>StepTags</c> in ElasticMoE.Runtime, frame version 2):
    /// 12 bits for the micro-batch (or validation batch) index, 10 for the layer ordinal or pipeline stage, 12 for
    /// each worker index. A test checks that <c>StepTags</c> has the same numbers.
    /// </summary>
    /// <remarks>
    /// Why check them here: past a limit the index wraps and two messages of the same step get the same tag,
    /// so a receiver takes the wrong micro-batch's activations. Nothing fails; the loss is just wrong. A run
    /// that cannot be tagged must be refused when its config is read, not discovered in its curve.
    /// </remarks>
    public const int MaxMicroBatchesPerStep = 4096, MaxEvalBatches = 4096, MaxLayers = 1024, MaxWorkers = 4096;

    /// <summary>Checks ranges and relations between settings, naming the offending key.</summary>
    public void Validate()
    {
        static void Require(bool ok, string key, string why)
        {
            if (!ok) throw new ConfigException($"elasticmoe.{key}: {why}");
        }
        if (!string.IsNullOrWhiteSpace(Cluster.Relayout))
        {
            try { Planning.RelayoutSchedule.Parse(Cluster.Relayout); }
            catch (FormatException ex) { throw new ConfigException($"elasticmoe.cluster.relayout: {ex.Message}"); }
        }
        var m = Model;
        Require(m.VocabSize >= 2, "model.vocab-size", "must hold the tokenizer's vocabulary");
        Require(m.DModel > 0, "model.d-model", "must be positive");
        if (m.Attention == AttentionKind.Mha)
        {
            Require(m.Heads > 0 && m.DModel % m.Heads == 0, "model.heads", $"must divide d-model ({m.DModel})");
            Require(m.HeadDim % 2 == 0, "model.heads", "d-model / heads must be even for RoPE");
        }
        else
        {
            // MLA's heads have widths of their own (model.mla.*): heads need not divide d-model.
            Require(m.Heads > 0, "model.heads", "must be positive");
            Require(m.QLoraRank >= 0, "model.mla.q-lora-rank", "must be zero (no query compression) or positive");
            Require(m.KvLoraRank > 0, "model.mla.kv-lora-rank", "must be positive");
            Require(m.QkNopeHeadDim > 0, "model.mla.qk-nope-head-dim", "must be positive");
            Require(m.QkRopeHeadDim > 0 && m.QkRopeHeadDim % 2 == 0, "model.mla.qk-rope-head-dim", $"must be positive and even for RoPE, got {m.QkRopeHeadDim}");
            Require(m.VHeadDim > 0, "model.mla.v-head-dim", "must be positive");
        }
        Require(m.Layers > 0, "model.layers", "must be positive");
        Require(m.Context > 1, "model.context", "must be at least 2");
        Require(m.DenseLayers >= 0 && m.DenseLayers <= m.Layers, "model.dense-layers", $"must be within 0..layers ({m.Layers})");
        Require(m.DenseHidden > 0, "model.dense-hidden", "must be positive");
        Require(m.NormEps > 0, "model.norm-eps", "must be positive");
        var e = m.MoE;
        Require(e.RoutedExperts > 0, "model.moe.routed-experts", "must be positive");
        Require(e.TopK > 0 && e.TopK <= e.RoutedExperts, "model.moe.top-k", $"must be within 1..routed-experts ({e.RoutedExperts})");
        Require(e.SharedExperts >= 0, "model.moe.shared-experts", "must be zero or more");
        Require(e.ExpertHidden > 0, "model.moe.expert-hidden", "must be positive");
        Require(e.BiasUpdateRate >= 0, "model.moe.bias-update-rate", "must be zero or more");
        Require(e.SequenceAuxAlpha >= 0, "model.moe.sequence-aux-alpha", "must be zero or more");
        Require(e.CapacityFactor >= 0, "model.moe.capacity-factor", "must be zero (no drop) or positive");
        Require(Data.ValidationFraction > 0 && Data.ValidationFraction < 0.5, "data.validation-fraction", "must be in (0, 0.5)");
        var t = Train;
        Require(t.Steps > 0, "train.steps", "must be positive");
        Require(t.MicroBatch > 0, "train.micro-batch", "must be positive");
        Require(t.GlobalBatch > 0 && t.GlobalBatch % t.MicroBatch == 0, "train.global-batch", $"must be a positive multiple of micro-batch ({t.MicroBatch})");
        Require(t.Lr > 0, "train.lr", "must be positive");
        Require(t.MinLr >= 0 && t.MinLr <= t.Lr, "train.min-lr", "must be within 0..lr");
        Require(t.WarmupSteps >= 0, "train.warmup-steps", "must be zero or more");
        Require(t.Beta1 is >= 0 and < 1, "train.beta1", "must be in [0, 1)");
        Require(t.Beta2 is >= 0 and < 1, "train.beta2", "must be in [0, 1)");
        Require(t.AdamEps > 0, "train.adam-eps", "must be positive");
        Require(t.GradClip >= 0, "train.grad-clip", "must be zero (off) or positive");
        Require(t.EvalEvery > 0, "train.eval-every", "must be positive");
        Require(t.EvalBatches > 0, "train.eval-batches", "must be positive");
        Require(t.TimeLimitSeconds >= 0, "train.time-limit", "must be zero (none) or positive");
        Require(m.Layers <= MaxLayers, "model.layers",
            $"is {m.Layers}, but data-plane tags carry the layer or stage index in 10 bits: at most {MaxLayers}");
        Require(t.MicroBatchesPerStep <= MaxMicroBatchesPerStep, "train.global-batch",
            $"global-batch / micro-batch is {t.MicroBatchesPerStep} micro-batches per step, but data-plane tags carry the micro-batch index in 12 bits: at most {MaxMicroBatchesPerStep}");
        Require(t.EvalBatches <= MaxEvalBatches, "train.eval-batches",
            $"is {t.EvalBatches}, but data-plane tags carry the validation batch index in 12 bits: at most {MaxEvalBatches}");
        var c = Cluster;
        Require(c.Port is >= 0 and <= 65535, "cluster.port", "must be a TCP port (0 = any)");
        Require(c.Devices >= 1, "cluster.devices", "must be at least 1");
        Require(c.Nodes >= 0, "cluster.nodes", "must be zero or more");
        Require(c.ExpectedNodes >= 0, "cluster.expected-nodes", "must be zero or more");
        Require(c.NodesToWaitFor >= 1, "cluster.expected-nodes", "the coordinator needs at least one node: set cluster.nodes or cluster.expected-nodes");
        Require(c.PipelineStages >= 1 && c.PipelineStages <= m.Layers, "cluster.pipeline-stages", $"must be within 1..layers ({m.Layers})");
        Require(c.ChecksumEvery >= 0, "cluster.checksum-every", "must be zero (never) or positive");
        Require(c.StepTimeoutSeconds > 0, "cluster.step-timeout", "must be positive");
        Require(c.MaxFrameMb >= 1, "cluster.max-frame-mb", "must be at least 1");
        // Checked after the ranges above, so a negative count is reported as such and not as a product.
        Require((long)c.Nodes * c.Devices <= MaxWorkers, "cluster.nodes",
            $"cluster.nodes x cluster.devices is {(long)c.Nodes * c.Devices} workers, but data-plane tags carry a worker index in 12 bits: at most {MaxWorkers}");
        Require((long)c.ExpectedNodes * c.Devices <= MaxWorkers, "cluster.expected-nodes",
            $"cluster.expected-nodes x cluster.devices is {(long)c.ExpectedNodes * c.Devices} workers, but data-plane tags carry a worker index in 12 bits: at most {MaxWorkers}");
        Require(c.PlanTimeoutSeconds > 0, "cluster.plan-timeout", "must be positive");
        Require(c.EvalTimeoutSeconds > 0, "cluster.eval-timeout", "must be positive");
        Require(c.FinishTimeoutSeconds > 0, "cluster.finish-timeout", "must be positive");
        Require(c.JoinSettleSeconds >= 0, "cluster.join-settle", "must be zero or positive");
        Require(c.LeaveSettleSeconds >= 0, "cluster.leave-settle", "must be zero or positive");
        Require(c.MaxWaitSeconds > 0, "cluster.max-wait", "must be positive");
        Require(Uri.CheckHostName(c.Host) != UriHostNameType.Unknown, "cluster.host",
            $"must be a host name or IP address of this machine to listen on (\"0.0.0.0\" = every interface, with cluster.public-host set), got \"{c.Host}\"");
        Require(c.PublicHost.Length == 0 || Uri.CheckHostName(c.PublicHost) != UriHostNameType.Unknown, "cluster.public-host",
            $"must be empty (= cluster.host) or the host name or IP address peers dial, got \"{c.PublicHost}\"");
        Require(!(c.PublicHost.Length == 0 && c.Host is "0.0.0.0" or "::"), "cluster.public-host",
            $"must be set when cluster.host is \"{c.Host}\" (every interface): peers need an address they can dial"
            );
        Require(c.CoordinatorWaitSeconds >= 0, "cluster.coordinator-wait", "must be zero or positive");
        Require(Checkpoint.Every >= 0, "checkpoint.every", "must be zero or positive");
        var fd = FailureDetection;
        Require(fd.HeartbeatInterval is > 0 and <= 60, "cluster.failure-detection.heartbeat-interval", "must be more than 0 and at most 60 seconds");
        Require(fd.AcceptablePause >= 2 * fd.HeartbeatInterval, "cluster.failure-detection.acceptable-pause",
            $"must be at least twice the heartbeat interval ({2 * fd.HeartbeatInterval:0.###} s): one late heartbeat must not make a member unreachable");
        Require(fd.ProbeTimeout is > 0 and <= 60, "cluster.failure-detection.probe-timeout", "must be more than 0 and at most 60 seconds");
        Require(fd.ProbeInterval is > 0 and <= 60, "cluster.failure-detection.probe-interval", "must be more than 0 and at most 60 seconds");
        Require(fd.StepOverdue == 0 || fd.StepOverdue >= 1.5, "cluster.failure-detection.step-overdue",
            "must be 0 (off) or at least 1.5 (times the median step: steps vary by tens of percent on a busy machine)");
        Require(Checkpoint.EverySeconds >= 0, "checkpoint.every-seconds", "must be zero or positive");
        Require(Checkpoint.Keep >= 1, "checkpoint.keep", "must be at least 1");
        var rb = Rebalance;
        Require(rb.Every >= 0, "rebalance.every", "must be zero (off) or positive");
        Require(rb.RedundantSlots >= 0, "rebalance.redundant-slots", "must be zero or positive");
        Require(rb.ChurnBudget > 0 && (rb.ChurnBudget < 1 || rb.ChurnBudget == Math.Floor(rb.ChurnBudget)), "rebalance.churn-budget",
            $"must be a fraction in (0, 1) or a whole number of copies, got {rb.ChurnBudget.ToString(System.Globalization.CultureInfo.InvariantCulture)}");
        Require(rb.Window >= 1, "rebalance.window", "must be at least 1 step");
        Require(rb.Threshold >= 1, "rebalance.threshold", "must be at least 1 (max/mean is never below 1)");
        Require(rb.Hysteresis >= 0, "rebalance.hysteresis", "must be zero or positive");
        // The layout the run starts with; the runtime checks later ones (nodes lost or joined) with RebalanceOptions.Validate.
        rb.Validate(m.MoE.RoutedExperts, c.NodesToWaitFor * c.Devices);
        Require(c.MinNodes >= 1, "cluster.min-nodes", "must be at least 1");
        Require(c.WorkerRestarts >= 0, "cluster.worker-restarts", "must be zero or positive");
        Require(c.Redundancy >= 0, "cluster.redundancy",
            $"must be 0 (no mirrors) or a positive number r of mirrors (every unit on r + 1 nodes, so any r may fail at once), got {c.Redundancy}");
        Require(c.FailureDomain is null || (c.FailureDomain.Trim().Length > 0 && c.FailureDomain.Trim() == c.FailureDomain && !c.FailureDomain.Any(char.IsControl)),
            "cluster.failure-domain", $"must be a non-empty name without leading, trailing or control characters (e.g. \"rack-1\" or a zone), " +
            $"or \"\" for the node to be a domain of its own; got \"{c.FailureDomain}\"");
        Require(Prometheus.Port is >= 0 and <= 65535, "metrics.prometheus.port", "must be a TCP port (0 = no endpoint)");
        Require(Uri.CheckHostName(Prometheus.Host) != UriHostNameType.Unknown, "metrics.prometheus.host",
            $"must be a host name or IP address (\"127.0.0.1\" = this machine only, \"0.0.0.0\" = every interface), got \"{Prometheus.Host}\"");
        Require(Threads >= 0, "threads", "must be zero (all cores) or positive");
        Require(Device is "cpu" or "cuda" || System.Text.RegularExpressions.Regex.IsMatch(Device, "^cuda:[0-9]{1,9}$"), "device",
            $"must be \"cpu\", \"cuda\" (worker i of a node on cuda:i) or \"cuda:N\" (worker i on cuda:N+i), got \"{Device}\"");
    }
}
