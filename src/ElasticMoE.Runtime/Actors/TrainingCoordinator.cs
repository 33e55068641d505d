using Akka.Actor;
using Akka.Event;
using ElasticMoE.Configuration;
using ElasticMoE.Planning;
using ElasticMoE.Runtime.Protocol;
using ElasticMoE.Training;

namespace ElasticMoE.Runtime.Actors;

/// <summary>How a distributed run ended: the same figures the single-process loop reports.</summary>
/// <param name="FinalParameters">Per parameter name: (sum, L2 norm) at the end, from the replica-0 owner.</param>
/// <param name="StoppedBy">The reason of the <see cref="StopRun"/> that ended the run early, else null. Steps
/// then holds every step that committed, and FinalParameters are those after the last of them.</param>
public sealed record RunResult(
    IReadOnlyList<StepResult> Steps,
    IReadOnlyList<(long Step, double ValLoss)> Validation,
    double Seconds,
    IReadOnlyDictionary<string, (double Sum, double Norm)> FinalParameters,
    string? StoppedBy = null);

/// <summary>
/// The cluster singleton that owns the plan and drives steps. Each step has three phases, each a
/// scatter/gather over actors: compute (forward, backward, dense all-reduce) on every stage; gradient
/// norms of every expert shard that takes requests from other workers (only after all stages finished,
/// so all expert gradients are in; skipped when every shard is private to its worker's stage, which
/// reports their norm itself); the update (clip scale, learning rate, total expert loads) everywhere.
/// Only then is the step committed.
/// </summary>
public sealed class TrainingCoordinator : ReceiveActor, IWithTimers
{
    private sealed record StepTimeout(long Step, int Epoch);

    private readonly ElasticMoEConfig _config;
    private readonly TrainingReport _report;
    private readonly TaskCompletionSource<RunResult> _done;
    private readonly ILoggingAdapter _log = Context.GetLogger();
    private readonly string _fingerprint;

    private readonly List<(string Address, long Uid, string[] Endpoints, IActorRef Agent)> _nodes = new();
    private TrainingPlan? _plan;
    private readonly Dictionary<int, IActorRef> _stages = new();
    private readonly Dictionary<(int Worker, int Ordinal), IActorRef> _shards = new();
    // Shards taking requests from other workers: the only ones asked for a gradient norm (a private
    // shard's norm comes with its stage's StepComputed).
    private readonly List<IActorRef> _sharedShards = new();
    private int _expectedShards;

    private long _step;
    private readonly System.Diagnostics.Stopwatch _clock = new();
    private System.Diagnostics.Stopwatch _stepClock = new();
    private readonly List<StepComputed> _computed = new();
    private readonly List<ExpertNorm> _norms = new();
    private readonly List<UpdateApplied> _applied = new();
    private readonly List<EvalComputed> _evals = new();
    private readonly List<StepResult> _results = new();
    private readonly List<(long, double)> _validation = new();
    private StepResult? _pendingResult;

    public ITimerScheduler Timers { get; set; } = null!;
    // ELASTICMOE_TRACE=1 logs each step's phase timings (with akka.loglevel = INFO).
    private static readonly bool Trace = Environment.GetEnvironmentVariable("ELASTICMOE_TRACE") == "1";
    private double _tCompute, _tNorm;

    public TrainingCoordinator(ElasticMoEConfig config, TrainingReport report, TaskCompletionSource<RunResult> done, long startStep = 0)
    {
        _config = config;
        _report = report;
        _done = done;
        _step = startStep;
        _fingerprint = TrainingState.Fingerprint(config.Model);
        Receive<IElasticMoEMessage>(OnMessage);
        Receive<StepTimeout>(OnStepTimeout);
        Receive<Akka.Cluster.ClusterEvent.UnreachableMember>(m => OnMemberLost(m.Member.Address, "became unreachable"));
        Receive<Akka.Cluster.ClusterEvent.MemberRemoved>(m => OnMemberLost(m.Member.Address, "left the cluster"));
        // A graceful leave (a node's SIGTERM) shows first as Leaving: stop then, before the node's
        // cancelled step could be reported as a worker failure under a misleading reason.
        Receive<Akka.Cluster.ClusterEvent.MemberLeft>(m => OnMemberLost(m.Member.Address, "left the cluster"));
    }

    // Until elastic membership lands, losing a node that holds part of the plan ends the run at once
    // with its name, instead of waiting for the step timeout.
    protected override void PreStart()
        => Akka.Cluster.Cluster.Get(Context.System).Subscribe(Self, Akka.Cluster.ClusterEvent.SubscriptionInitialStateMode.InitialStateAsEvents,
            typeof(Akka.Cluster.ClusterEvent.UnreachableMember), typeof(Akka.Cluster.ClusterEvent.MemberRemoved),
            typeof(Akka.Cluster.ClusterEvent.MemberLeft));

    protected override void PostStop() => Akka.Cluster.Cluster.Get(Context.System).Unsubscribe(Self);

    private void OnMemberLost(Address address, string what)
    {
        if (_finished || _plan is null || !_plan.Workers.Any(w => w.NodeAddress == address.ToString())) return;
        Fail($"node {address} {what} at step {_step}; elastic recovery is not built yet, so the run stops");
    }

    public static Props Props(ElasticMoEConfig config, TrainingReport report, TaskCompletionSource<RunResult> done)
        => Akka.Actor.Props.Create(() => new TrainingCoordinator(config, report, done, 0));

    private void OnMessage(IElasticMoEMessage message)
    {
        switch (message)
        {
            case RegisterNode m: OnRegisterNode(m); break;
            case PlanReady m: OnPlanReady(m); break;
            case ShardReady m: OnShardReady(m); break;
            case StepComputed m: OnStepComputed(m); break;
            case ExpertNorm m: OnExpertNorm(m); break;
            case UpdateApplied m: OnUpdateApplied(m); break;
            case EvalComputed m: OnEvalComputed(m); break;
            case ParameterSummary m: OnParameterSummary(m); break;
            case WorkerFailed m: Fail($"worker {m.Worker} failed at step {m.Step}: {m.Reason}"); break;
            case StopRun m: OnStopRun(m); break;
            default: _log.Warning("coordinator: unexpected {0}", message.GetType().Name); break;
        }
    }

    private void OnRegisterNode(RegisterNode m)
    {
        if (m.ModelFingerprint != _fingerprint || m.Seed != _config.Seed)
        {
            var reason = m.ModelFingerprint != _fingerprint
                ? $"model config differs: node has {m.ModelFingerprint}, coordinator has {_fingerprint}"
                : $"seed differs: node has {m.Seed}, coordinator has {_config.Seed}";
            _log.Warning("refusing node {0}: {1}", m.NodeAddress, reason);
            Sender.Tell(new NodeRefused(m.NodeAddress, reason));
            return;
        }
        if (_nodes.Any(n => n.Address == m.NodeAddress))
        {
            Sender.Tell(new NodeAccepted(m.NodeAddress));   // a retry of a registration we already have
            return;
        }
        if (_plan is not null)
        {
            Sender.Tell(new NodeRefused(m.NodeAddress, "the run has started; joining a running job comes with elastic membership"));
            return;
        }
        _nodes.Add((m.NodeAddress, m.SystemUid, m.DataEndpoints, Sender));
        Sender.Tell(new NodeAccepted(m.NodeAddress));
        _report.Info($"node {m.NodeAddress} joined with {m.DataEndpoints.Length} device(s) ({_nodes.Count}/{_config.Cluster.NodesToWaitFor})");
        if (_nodes.Count == _config.Cluster.NodesToWaitFor) AssignFirstPlan();
    }

    private void AssignFirstPlan()
    {
        // Workers in a stable order (node address, then device), so a layout is reproducible.
        var slots = _nodes.OrderBy(n => n.Address, StringComparer.Ordinal)
            .SelectMany(n => n.Endpoints.Select((e, d) => new WorkerSlot(new WorkerId(n.Address, n.Uid, d), e))).ToList();
        try
        {
            _plan = LayoutPlanner.Plan(1, slots, _config.Cluster.PipelineStages, _config.Model);
        }
        catch (ArgumentException ex)
        {
            Fail($"cannot lay out {slots.Count} workers: {ex.Message}");
            return;
        }
        _expectedShards = Enumerable.Range(0, _plan.ExpertOwner.Length)
            .Sum(o => _plan.ExpertOwner[o].Distinct().Count());
        var msg = new AssignPlan(_plan.Epoch, _plan.Dp, _plan.Pp,
            _plan.Stages.Select(s => s.First).ToArray(), _plan.Stages.Select(s => s.End).ToArray(),
            _plan.Workers.Select(w => new WorkerInfo(w.NodeAddress, w.Device, w.DataEndpoint, w.Id.SystemUid)).ToArray(),
            _plan.ExpertOwner, _step);
        _report.Info($"plan: {_plan.WorldSize} worker(s), DP {_plan.Dp} x PP {_plan.Pp}, stages " +
                     string.Join(" ", _plan.Stages.Select(s => $"[{s.First},{s.End})")) +
                     $", experts spread over {(_plan.ExpertOwner.Length == 0 ? 0 : _plan.ExpertOwner.SelectMany(o => o).Distinct().Count())} worker(s)");
        foreach (var n in _nodes) n.Agent.Tell(msg);
    }

    private void OnPlanReady(PlanReady m)
    {
        if (_plan is null || m.Epoch != _plan.Epoch) return;
        _stages[m.Worker] = Sender;
        MaybeStart();
    }

    private void OnShardReady(ShardReady m)
    {
        if (_plan is null || m.Epoch != _plan.Epoch) return;
        _shards[(m.Worker, m.MoEOrdinal)] = Sender;
        if (!_plan.ShardIsPrivate(m.MoEOrdinal, m.Worker, _config.Model.DenseLayers)) _sharedShards.Add(Sender);
        MaybeStart();
    }

    private void MaybeStart()
    {
        if (_plan is null || _stages.Count < _plan.WorldSize || _shards.Count < _expectedShards) return;
        if (_clock.IsRunning) return;
        _clock.Start();
        StartStep();
    }

    private void StartStep()
    {
        if (_stopReason is not null || _step >= _config.Train.Steps || (_config.Train.TimeLimitSeconds > 0 && _clock.Elapsed.TotalSeconds >= _config.Train.TimeLimitSeconds))
        {
            Finish();
            return;
        }
        _computed.Clear();
        _norms.Clear();
        _applied.Clear();
        _stepClock = System.Diagnostics.Stopwatch.StartNew();
        Timers.StartSingleTimer("step", new StepTimeout(_step, _plan!.Epoch), TimeSpan.FromSeconds(_config.Cluster.StepTimeoutSeconds));
        var run = new RunStep(_plan.Epoch, _step);
        foreach (var s in _stages.Values) s.Tell(run);
    }

    private void OnStepComputed(StepComputed m)
    {
        if (m.Epoch != _plan!.Epoch || m.Step != _step) return;
        _computed.Add(m);
        if (_computed.Count < _plan.WorldSize) return;
        _tCompute = _stepClock.Elapsed.TotalMilliseconds;
        if (_sharedShards.Count == 0) { _tNorm = _tCompute; ApplyUpdate(); }
        else foreach (var s in _sharedShards) s.Tell(new QueryExpertNorm(_plan.Epoch, _step));
    }

    private void OnExpertNorm(ExpertNorm m)
    {
        if (m.Epoch != _plan!.Epoch || m.Step != _step) return;
        _norms.Add(m);
        if (_norms.Count == _sharedShards.Count) { _tNorm = _stepClock.Elapsed.TotalMilliseconds; ApplyUpdate(); }
    }

    private void ApplyUpdate()
    {
        var plan = _plan!;
        var t = _config.Train;
        int totalMicro = t.MicroBatchesPerStep;
        double loss = _computed.Sum(c => c.LossSum) / totalMicro;
        if (!double.IsFinite(loss)) { Fail(new TrainingDivergedException(_step, "the loss", loss)); return; }
        // Replicas hold identical reduced dense gradients: count each stage once (replica 0). Private
        // experts exist only with one replica, so they are counted once too.
        double sumSq = _computed.Where(c => plan.ReplicaOf(c.Worker) == 0).Sum(c => c.GradSumSq) + _norms.Sum(n => n.SumSq);
        if (!double.IsFinite(sumSq)) { Fail(new TrainingDivergedException(_step, "the gradient norm", Math.Sqrt(sumSq))); return; }
        int moeLayers = plan.ExpertOwner.Length;
        var loads = Enumerable.Range(0, moeLayers).Select(_ => new long[_config.Model.MoE.RoutedExperts]).ToArray();
        foreach (var c in _computed)
            for (int i = 0; i < c.MoELayers.Length; i++)
                for (int e = 0; e < loads[c.MoELayers[i]].Length; e++)
                    loads[c.MoELayers[i]][e] += c.ExpertCounts[i][e];
        double lr = LrSchedule.At(_step, t.Steps, t.Lr, t.MinLr, t.WarmupSteps);
        bool checksum = _config.Cluster.ChecksumEvery > 0 && plan.Dp > 1 && (_step + 1) % _config.Cluster.ChecksumEvery == 0;
        _pendingResult = new StepResult(_step, loss, lr, Math.Sqrt(sumSq), LoadBalance.MeanMaxVio(loads), loads,
            (long)t.GlobalBatch * _config.Model.Context, 0);
        var update = new ApplyUpdate(plan.Epoch, _step, lr, GradClip.Coefficient(sumSq, t.GradClip), loads, checksum);
        foreach (var s in _stages.Values) s.Tell(update);
        foreach (var s in _shards.Values) s.Tell(update);
    }

    private void OnUpdateApplied(UpdateApplied m)
    {
        if (m.Epoch != _plan!.Epoch || m.Step != _step) return;
        _applied.Add(m);
        if (_applied.Count < _stages.Count + _shards.Count) return;
        if (!ChecksumsAgree(out var why)) { Fail(why); return; }
        var r = _pendingResult! with { Seconds = _stepClock.Elapsed.TotalSeconds };
        if (Trace) _log.Info("step {0}: compute {1:F1} ms, expert norms {2:F1} ms, update {3:F1} ms", _step, _tCompute, _tNorm - _tCompute, _stepClock.Elapsed.TotalMilliseconds - _tNorm);
        _results.Add(r);
        _step++;
        bool last = _step >= _config.Train.Steps
                    || (_config.Train.TimeLimitSeconds > 0 && _clock.Elapsed.TotalSeconds >= _config.Train.TimeLimitSeconds);
        if (_step % _config.Train.EvalEvery == 0 || last)
        {
            _evals.Clear();
            foreach (var s in _stages.Values) s.Tell(new RunEval(_plan.Epoch, _step));
            return;
        }
        Timers.Cancel("step");
        _report.Step(r, null, _config.Train.Steps);
        StartStep();
    }

    private bool ChecksumsAgree(out string why)
    {
        why = "";
        var plan = _plan!;
        // Only stages answer with a checksum (shards send 0), and only on checksum steps.
        var sums = _applied.Where(a => a.DenseChecksum != 0).ToList();
        foreach (var stage in Enumerable.Range(0, plan.Pp))
        {
            var values = sums.Where(a => plan.StageOf(a.Worker) == stage).Select(a => a.DenseChecksum).Distinct().ToList();
            if (values.Count > 1)
            {
                why = $"dense parameters of stage {stage} differ between data-parallel replicas after step {_step}: checksums {string.Join(", ", values.Select(v => v.ToString("X16")))}";
                return false;
            }
        }
        return true;
    }

    private void OnEvalComputed(EvalComputed m)
    {
        if (m.Epoch != _plan!.Epoch || m.Step != _step) return;
        _evals.Add(m);
        if (_evals.Count < _stages.Count) return;
        Timers.Cancel("step");
        double val = _evals.Sum(e => e.LossSum) / _config.Train.EvalBatches;
        _validation.Add((_step, val));
        _report.Step(_results[^1], val, _config.Train.Steps);
        StartStep();
    }

    private void OnStepTimeout(StepTimeout t)
    {
        if (_plan is null || t.Epoch != _plan.Epoch || t.Step != _step) return;
        Fail($"step {_step} did not complete within {_config.Cluster.StepTimeoutSeconds:F0} s");
    }

    private readonly Dictionary<string, (double, double)> _finalParameters = new(StringComparer.Ordinal);
    private int _summaries;
    private double _runSeconds;

    private bool _finished;

    private void Finish()
    {
        _finished = true;
        Timers.CancelAll();
        _runSeconds = _clock.Elapsed.TotalSeconds;
        _summaries = 0;
        var ask = new ReportParameters(_plan!.Epoch);
        foreach (var s in _stages.Values) s.Tell(ask);
        foreach (var s in _shards.Values) s.Tell(ask);
    }

    private void OnParameterSummary(ParameterSummary m)
    {
        // Replicas agree (checked by checksum); keep the first answer for each name.
        for (int i = 0; i < m.Names.Length; i++) _finalParameters.TryAdd(m.Names[i], (m.Sums[i], m.Norms[i]));
        if (++_summaries < _stages.Count + _shards.Count) return;
        foreach (var n in _nodes) n.Agent.Tell(FinalShutdown());
        _done.TrySetResult(new RunResult(_results, _validation, _runSeconds, _finalParameters, _stopReason));
    }

    // A divergence fails the run with its own exception type, so callers tell it apart by type, not wording.
    private void Fail(TrainingDivergedException diverged) => Fail(diverged.Message, diverged);

    private void Fail(string reason, Exception? error = null)
    {
        if (_finished) return;
        _finished = true;
        Timers.CancelAll();
        _log.Error("training stopped: {0}", reason);
        foreach (var n in _nodes) n.Agent.Tell(new Shutdown(reason));
        _done.TrySetException(error ?? new TrainingFailedException(reason));
    }

    // ---- StopRun: ending the run early on request (elasticmoe train on SIGTERM/SIGINT) ----------------
    // Everything about it is here, plus three hooks: the `case StopRun` above, the `_stopReason` test
    // in StartStep (no next step), and FinalShutdown/_stopReason where the finish reports its result.

    private string? _stopReason;

    private void OnStopRun(StopRun m)
    {
        if (_finished || _stopReason is not null) return;   // already ending; a repeated request changes nothing
        _stopReason = m.Reason;
        // Steps under way: a step (or its evaluation) is always in flight then, and StartStep finishes
        // instead of starting the next one once it commits.
        if (_clock.IsRunning) return;
        // No step has started (still waiting for nodes or for the plan): nothing to summarise.
        _finished = true;
        Timers.CancelAll();
        foreach (var n in _nodes) n.Agent.Tell(FinalShutdown());
        _done.TrySetResult(new RunResult(_results, _validation, 0, new Dictionary<string, (double, double)>(), _stopReason));
    }

    private Shutdown FinalShutdown() => _stopReason is null
        ? new Shutdown("training finished", RunEnd.Finished)
        : new Shutdown($"the run was stopped: {_stopReason}", RunEnd.Stopped);
}

/// <summary>The distributed run stopped; the message says where and why.</summary>
public sealed class TrainingFailedException(string message) : Exception(message);
