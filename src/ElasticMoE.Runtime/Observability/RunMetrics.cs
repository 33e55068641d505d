using System.Globalization;
using ElasticMoE.Runtime.DataPlane;
using ElasticMoE.Training;
using Prometheus;

namespace ElasticMoE.Runtime.Observability;

/// <summary>
/// This process's run metrics, as its Prometheus endpoint (<see cref="MetricsEndpoint"/>) serves them.
/// </summary>
/// <remarks>
/// <para>
/// Static, because the endpoint is per process and its figures come from all over it: the training report
/// (steps and membership changes, through <see cref="Observer"/>), the coordinator (plans and checkpoints,
/// through <see cref="PlanInstalled"/> and <see cref="CheckpointStall"/>) and the data plane (bytes, read from
/// <see cref="DataPlaneTraffic"/> when scraped). An update is a lock-free add or store, so the hooks are
/// always live, endpoint or not, and callers need not know whether one runs.
/// </para>
/// <para>
/// Its own registry rather than prometheus-net's default one: the default one starts .NET event-counter
/// and meter listeners in the process on its first scrape, a cost a training process should not pay unasked.
/// The process's CPU, memory and GC figures are added explicitly.
/// </para>
/// </remarks>
public static class RunMetrics
{
    /// <summary>What the endpoint serves.</summary>
    public static CollectorRegistry Registry { get; } = NewRegistry();

    private static readonly MetricFactory Factory = Metrics.WithCustomRegistry(Registry);

    // 5 ms to ~80 s, doubling: a tiny test model's step to a large model's on a slow node.
    private static readonly Histogram StepSeconds = Factory.CreateHistogram("elasticmoe_step_seconds",
        "Wall time of each committed step.", new HistogramConfiguration { Buckets = Histogram.ExponentialBuckets(0.005, 2, 15) });
    private static readonly Gauge LastStep = Factory.CreateGauge("elasticmoe_step", "The last committed step (1-based, as in the metrics file).");
    private static readonly Gauge TokensPerSecond = Factory.CreateGauge("elasticmoe_tokens_per_second", "Tokens per second of the last committed step.");
    private static readonly Gauge Loss = Factory.CreateGauge("elasticmoe_loss", "Training loss of the last committed step.");
    private static readonly Gauge ValidationLoss = Factory.CreateGauge("elasticmoe_validation_loss", "The last validation loss.");
    private static readonly Gauge GradNorm = Factory.CreateGauge("elasticmoe_grad_norm", "Global gradient norm of the last committed step.");
    private static readonly Gauge ExpertLoad = Factory.CreateGauge("elasticmoe_expert_load_tokens",
        "Tokens routed to each expert in the last committed step; layer is the MoE layer's ordinal (as in the metrics file's expert_counts).", "layer", "expert");
    private static readonly Counter Recoveries = Factory.CreateCounter("elasticmoe_recoveries_total",
        "Membership changes the run re-planned around, by kind (node-lost, node-joined, node-left, worker-retired).", "kind");
    private static readonly Counter RecoverySeconds = Factory.CreateCounter("elasticmoe_recovery_seconds_total",
        "Seconds from each membership change to the next committed step, summed, by kind.", "kind");
    private static readonly Counter Replans = Factory.CreateCounter("elasticmoe_replans_total", "Plans installed, the first included.");
    private static readonly Counter ReplanSeconds = Factory.CreateCounter("elasticmoe_replan_seconds_total", "Seconds the installed plans took, summed.");
    private static readonly Gauge PlanEpoch = Factory.CreateGauge("elasticmoe_plan_epoch", "Epoch of the plan installed last.");
    private static readonly Counter Checkpoints = Factory.CreateCounter("elasticmoe_checkpoints_total", "Checkpoints whose stall was reported.");
    private static readonly Counter CheckpointStallSeconds = Factory.CreateCounter("elasticmoe_checkpoint_stall_seconds_total",
        "Seconds training waited for checkpoints, summed (0 for a copy that overlapped compute).");
    private static readonly Counter DataPlaneSent = Factory.CreateCounter("elasticmoe_dataplane_sent_bytes_total",
        "Bytes this process's data plane sent (frame headers included).");
    private static readonly Counter DataPlaneReceived = Factory.CreateCounter("elasticmoe_dataplane_received_bytes_total",
        "Bytes this process's data plane received (frame headers included).");

    static RunMetrics()
    {
        // The data plane counts for itself (two adds per frame); the metrics catch up when scraped.
        Registry.AddBeforeCollectCallback(() =>
        {
            DataPlaneSent.IncTo(DataPlaneTraffic.BytesSent);
            DataPlaneReceived.IncTo(DataPlaneTraffic.BytesReceived);
        });
    }

    private static CollectorRegistry NewRegistry()
    {
        var registry = Metrics.NewCustomRegistry();
        DotNetStats.Register(registry);
        return registry;
    }

    /// <summary>Give this to the run's <see cref="TrainingReport"/>: it feeds the step and membership metrics.</summary>
    public static ITrainingObserver Observer { get; } = new ReportObserver();

    /// <summary>
    /// The coordinator installed plan <paramref name="epoch"/>, the first one included; <paramref name="seconds"/> is
    /// how long it took (non-finite or negative values count the plan but add no time).
    /// </summary>
    public static void PlanInstalled(long epoch, double seconds)
    {
        Replans.Inc();
        if (double.IsFinite(seconds) && seconds > 0) ReplanSeconds.Inc(seconds);
        PlanEpoch.Set(epoch);
    }

    /// <summary>
    /// A checkpoint held training up for <paramref name="seconds"/>: 0 when its copy overlapped compute
    /// (non-finite or negative values count the checkpoint but add no time).
    /// </summary>
    public static void CheckpointStall(double seconds)
    {
        Checkpoints.Inc();
        if (double.IsFinite(seconds) && seconds > 0) CheckpointStallSeconds.Inc(seconds);
    }

    private sealed class ReportObserver : ITrainingObserver
    {
        // The load gauge's children by [layer][expert], so that a step's update formats no label strings.
        // Replaced whole when the shape changes; two threads building it at once get the same children.
        private Gauge.Child[][] _load = [];

        public void Step(StepResult step, double? valLoss)
        {
            StepSeconds.Observe(step.Seconds);
            LastStep.Set(step.Step + 1);
            TokensPerSecond.Set(step.TokensPerSecond);
            Loss.Set(step.Loss);
            GradNorm.Set(step.GradNorm);
            if (valLoss is { } v) ValidationLoss.Set(v);
            var load = LoadChildren(step.ExpertCounts);
            for (int l = 0; l < load.Length; l++)
            for (int e = 0; e < load[l].Length; e++)
                load[l][e].Set(step.ExpertCounts[l][e]);
        }

        private Gauge.Child[][] LoadChildren(long[][] counts)
        {
            var load = Volatile.Read(ref _load);
            bool same = load.Length == counts.Length;
            for (int l = 0; same && l < load.Length; l++) same = load[l].Length == counts[l].Length;
            if (same) return load;
            load = counts.Select((c, l) => Enumerable.Range(0, c.Length)
                .Select(e => ExpertLoad.WithLabels(l.ToString(CultureInfo.InvariantCulture), e.ToString(CultureInfo.InvariantCulture))).ToArray()).ToArray();
            Volatile.Write(ref _load, load);
            return load;
        }

        public void MembershipEvent(string kind, string node, long step, double recoverySeconds)
        {
            Recoveries.WithLabels(kind).Inc();
            if (double.IsFinite(recoverySeconds) && recoverySeconds > 0) RecoverySeconds.WithLabels(kind).Inc(recoverySeconds);
        }
    }
}
