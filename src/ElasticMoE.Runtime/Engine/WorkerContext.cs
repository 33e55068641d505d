using ElasticMoE.Configuration;
using ElasticMoE.Data;
using ElasticMoE.Model;
using ElasticMoE.Planning;
using ElasticMoE.Runtime.DataPlane;
using ElasticMoE.Runtime.Protocol;
using ElasticMoE.State;
using static TorchSharp.torch;

namespace ElasticMoE.Runtime.Engine;

/// <summary>
/// Everything one device worker computes with, for the worker's whole life: the config, the model's
/// architecture (built once from the seed), the training-state units bound to it, the data plane of its
/// node, the current plan and the current step attempt. Plans come and go; this stays.
/// </summary>
/// <remarks>
/// A unit this worker does not hold is released (values NaN, no moments): any accidental use of stale
/// state shows as a diverged loss at once rather than silently training on old weights. At the first
/// plan every unit is its seed-initialised value everywhere, so no transfer is needed then.
/// </remarks>
public sealed class WorkerContext : IDisposable
{
    public ElasticMoEConfig Config { get; }
    public MoETransformer Model { get; }
    public DataPlaneNode DataPlane { get; }
    public BatchSampler Sampler { get; }
    public Device Device { get; }
    /// <summary>The worker identity of the node incarnation using this context now (see <see cref="Rebind"/>).</summary>
    public WorkerId Id { get; private set; }
    public FaultInjection? Faults { get; }

    /// <summary>Every unit of the model, bound to its tensors; <see cref="Holds"/> says which are this worker's.</summary>
    public IReadOnlyDictionary<UnitId, StateUnit> Units => _units;
    private readonly SortedDictionary<UnitId, StateUnit> _units;
    private readonly HashSet<UnitId> _held;
    // Canonical unit order (UnitCatalog.All is sorted): a unit's index names it in transfer tags.
    private readonly List<UnitId> _catalog;

    public TrainingPlan? Plan { get; private set; }

    /// <summary>The coordinator of the plan installed last: where a re-created stage or shard reports.</summary>
    public Akka.Actor.IActorRef Coordinator { get; set; } = Akka.Actor.ActorRefs.Nobody;
    /// <summary>This worker's rank in <see cref="Plan"/>, or -1 while the plan leaves it idle.</summary>
    public int Worker { get; private set; } = -1;

    /// <summary>Cancelled when the node (incarnation) stops: every wait on a peer gives up at once.</summary>
    public CancellationToken Stopping { get; private set; }

    /// <summary>One timeout for every wait of a step: <c>cluster.step-timeout</c>.</summary>
    public TimeSpan StepTimeout { get; }

    public WorkerContext(ElasticMoEConfig config, TextCorpus corpus, DataPlaneNode dataPlane, WorkerId id, CancellationToken stopping = default)
    {
        Stopping = stopping;
        Config = config;
        Id = id;
        Device = Training.TorchSetup.ResolveDevice(config, id.Device);
        Model = new MoETransformer(config.Model, config.Seed, Device);
        DataPlane = dataPlane;
        Sampler = new BatchSampler(corpus, config.Seed, config.Model.Context);
        StepTimeout = TimeSpan.FromSeconds(config.Cluster.StepTimeoutSeconds);
        _units = UnitBinding.Bind(Model);
        _catalog = UnitCatalog.All(config.Model).ToList();
        // Until the first plan, every unit is its seed value on every worker: all are "held".
        _held = new HashSet<UnitId>(_units.Keys);
        Faults = FaultInjection.Parse(config.Cluster.FaultInjection);
    }

    /// <summary>
    /// Hands this context to a new incarnation of its node (a new ActorSystem after the coordinator was
    /// lost): the units, plan and attempt fences stay; identity, stop token and coordinator are the new
    /// incarnation's. The old incarnation's actors have all stopped by then (its system terminated).
    /// </summary>
    public void Rebind(WorkerId id, CancellationToken stopping)
    {
        lock (_gate)
        {
            Id = id;
            Stopping = stopping;
            Coordinator = Akka.Actor.ActorRefs.Nobody;
        }
    }

    /// <summary>
    /// What this worker holds under its installed plan, for a coordinator that may adopt it: the plan's
    /// epoch and this worker's identity in it, each held unit with its applied step and checksum, and the
    /// newest epoch any attempt used. Null when no plan gives it units.
    /// </summary>
    public Protocol.HeldUnits? DescribeHeld()
    {
        lock (_gate)
        {
            if (!Active) return null;
            var plan = Plan!;
            var me = plan.Workers[Worker];
            var units = _held.Order().ToList();
            return new Protocol.HeldUnits(Id.Device,
                new Protocol.WorkerInfo(me.NodeAddress, me.Device, me.DataEndpoint, me.Id.SystemUid), plan.Epoch,
                Math.Max(plan.Epoch, _current.Epoch),
                units.Select(u => u.ToString()).ToArray(), units.Select(u => _units[u].AppliedStep).ToArray(),
                units.Select(u => _units[u].Checksum()).ToArray());
        }
    }

    /// <summary>True when this worker has the unit's current state: held, mirrored, or retired by the plan just installed.</summary>
    public bool Holds(UnitId unit) => _held.Contains(unit) || _retired.Contains(unit);
    public int HeldCount => _held.Count;
    public int UnitIndex(UnitId unit)
    {
        int i = _catalog.BinarySearch(unit);
        return i >= 0 ? i : throw new ArgumentException($"unknown unit {unit}");
    }

    // Units the plan just installed no longer gives this worker. Their values are still current until the
    // plan's first step runs, and until then the coordinator may fall back to the previous plan (a node lost
    // in the middle of an install), whose transfers may need them: so they are released at that first step.
    private readonly HashSet<UnitId> _retired = new();

    /// <summary>
    /// Takes up <paramref name="plan"/>: keeps the units it gives this worker (its own and the mirrors it
    /// keeps for its buddies) and retires every other.
    /// </summary>
    public void Install(TrainingPlan plan, int rank)
    {
        var keep = rank < 0 ? new HashSet<UnitId>() : plan.HoldingsOf(rank, Config.Model).ToHashSet();
        foreach (var u in keep)
            if (!Holds(u))
                throw new InvalidOperationException($"worker {Id}: plan epoch {plan.Epoch} gives it unit {u}, which it neither held nor received");
        lock (_gate)
        {
            foreach (var u in _held.Where(u => !keep.Contains(u)).ToList())
            {
                _retired.Add(u);
                _held.Remove(u);
            }
            foreach (var u in keep)
                if (_retired.Remove(u)) _held.Add(u);
            Plan = plan;
            Worker = rank;
        }
    }

    // Under _gate, when the first attempt of the installed plan starts.
    private void ReleaseRetired()
    {
        foreach (var u in _retired) _units[u].Release();
        _retired.Clear();
    }

    /// <summary>
    /// Forgets the seed-initialised state of a worker that joins a running job: its units are stale (the
    /// run has trained since), so it holds nothing until units arrive for it.
    /// </summary>
    public void ReleaseAll()
    {
        foreach (var u in _held.Concat(_retired)) _units[u].Release();
        _held.Clear();
        _retired.Clear();
    }

    /// <summary>Marks a unit as received (after its import verified).</summary>
    public void Received(UnitId unit)
    {
        _retired.Remove(unit);
        _held.Add(unit);
    }

    public bool Active => Plan is not null && Worker >= 0;
    public TrainingPlan ActivePlan => Plan ?? throw new InvalidOperationException("no plan installed");
    public int Stage => ActivePlan.StageOf(Worker);
    public int Replica => ActivePlan.ReplicaOf(Worker);
    public StageRange Blocks => ActivePlan.Stages[Stage];
    public bool IsFirstStage => Stage == 0;
    public bool IsLastStage => Stage == ActivePlan.Pp - 1;

    /// <summary>MoE layer ordinal (index among MoE layers) of block <paramref name="block"/>.</summary>
    public int MoEOrdinal(int block) => block - Config.Model.DenseLayers;

    public IEnumerable<MoELayer> StageMoELayers
        => Model.Blocks.Skip(Blocks.First).Take(Blocks.End - Blocks.First).Select(b => b.MoE).OfType<MoELayer>();

    /// <summary>Units of this worker's stage slice (replicated across data-parallel ranks), canonical order.</summary>
    public List<StateUnit> StageUnits()
        => UnitCatalog.StageUnits(Config.Model, Blocks.First, Blocks.End).Order().Select(u => _units[u]).ToList();

    /// <summary>Expert units of MoE layer <paramref name="moeOrdinal"/> placed on this worker, ascending expert.</summary>
    public List<StateUnit> ExpertUnits(int moeOrdinal)
        => ActivePlan.ExpertsOn(moeOrdinal, Worker).Select(e => _units[UnitId.OfExpert(moeOrdinal + Config.Model.DenseLayers, e)]).ToList();

    /// <summary>Trainable parameters of some units, named as in the single-process model.</summary>
    public static List<(string Name, Tensor Param)> ParametersOf(IEnumerable<StateUnit> units)
        => units.SelectMany(u => u.Tensors.Where(t => t.IsParameter).Select(t => (t.Name, t.Value))).ToList();

    // ---- step attempts -------------------------------------------------------------------------

    private readonly object _gate = new();
    private Fence _current = new(-1, -1, -1);
    private Fence _abortedUpTo = new(-1, -1, -1);
    private CancellationTokenSource _attempt = new();
    private TagFence? _staleFrames;

    /// <summary>The attempt this worker is working on (the latest it has seen).</summary>
    public Fence CurrentAttempt { get { lock (_gate) return _current; } }

    /// <summary>
    /// The cancellation token of attempt <paramref name="fence"/>, starting it if it is newer than the
    /// current one (its stale frames are then dropped). Null for a fence older than the current attempt:
    /// the message belongs to an aborted attempt and must be ignored.
    /// </summary>
    public CancellationToken? Enter(Fence fence)
    {
        lock (_gate)
        {
            if (fence < _current) return null;
            if (fence > _current)
            {
                if (_retired.Count > 0 && Plan is { } plan && fence.Epoch == plan.Epoch) ReleaseRetired();
                // Whatever still waits in the older attempt is void now (it was aborted, or it is done).
                _attempt.Cancel();
                _current = fence;
                _attempt = CancellationTokenSource.CreateLinkedTokenSource(Stopping);
                if (fence <= _abortedUpTo) _attempt.Cancel();
                // Frames of older attempts, buffered now or arriving late, are dropped and their buffers
                // returned; this fence covers every older one, so the previous fence is lifted.
                var previous = _staleFrames;
                _staleFrames = DataPlane.Fence(tag => StepTags.IsStale(tag, fence));
                previous?.Dispose();
            }
            return _attempt.Token;
        }
    }

    /// <summary>
    /// Cancels attempt <paramref name="fence"/> (and anything older) from any thread: a stage blocked in
    /// one of its waits lets go at once; an attempt not yet begun starts cancelled.
    /// </summary>
    public void Abort(Fence fence)
    {
        lock (_gate)
        {
            if (fence > _abortedUpTo) _abortedUpTo = fence;
            if (_current <= fence) _attempt.Cancel();
        }
    }

    /// <summary>Throws the injected fault if <c>cluster.fault-injection</c> names this phase of this attempt.</summary>
    public void MaybeInject(FaultPhase phase, Fence fence)
    {
        if (Faults is not { } f || !f.Matches(phase, fence, Worker)) return;
        if (f.Kill)
        {
            FaultInjection.KillThisProcess($"fault injection: killing this process in {phase.ToString().ToLowerInvariant()} of step {fence.Step} attempt {fence.Attempt} on worker {Worker}");
        }
        if (f.Crash)
            throw new InvalidOperationException($"crash injected in {phase.ToString().ToLowerInvariant()} of step {fence.Step} attempt {fence.Attempt} on worker {Worker}");
        throw new InjectedFaultException($"fault injected in {phase.ToString().ToLowerInvariant()} of step {fence.Step} attempt {fence.Attempt} on worker {Worker}");
    }

    /// <summary>Waits for a data-plane task under the attempt's token and the step timeout.</summary>
    public void Wait(Task task, CancellationToken attempt, string what)
    {
        try
        {
            if (!task.Wait(StepTimeout, attempt))
                throw new TimeoutException($"worker {Worker}: {what} did not complete within {StepTimeout.TotalSeconds:F0} s");
        }
        catch (OperationCanceledException) when (attempt.IsCancellationRequested)
        {
            throw new AttemptAbortedException($"worker {Worker}: {what} aborted");
        }
    }

    /// <summary>Sum and L2 norm of each parameter, for comparing runs laid out differently.</summary>
    public static ParameterSummary Summarize(int worker, IEnumerable<(string Name, Tensor Param)> parameters)
    {
        var list = parameters.ToList();
        using var scope = NewDisposeScope();
        return new ParameterSummary(worker, list.Select(p => p.Name).ToArray(),
            list.Select(p => p.Param.detach().to(ScalarType.Float64).sum().item<double>()).ToArray(),
            list.Select(p => p.Param.detach().to(ScalarType.Float64).norm().item<double>()).ToArray());
    }

    public void Dispose()
    {
        _staleFrames?.Dispose();
        foreach (var u in _units.Values) u.Dispose();
        Model.Dispose();
    }
}

/// <summary>The attempt was aborted while this worker waited in it.</summary>
public sealed class AttemptAbortedException(string message) : Exception(message);

/// <summary>A fault injected on purpose (<c>cluster.fault-injection</c>).</summary>
public sealed class InjectedFaultException(string message) : Exception(message);

/// <summary>The phases of a step where a fault can be injected.</summary>
public enum FaultPhase { Forward, Dispatch, Backward, AllReduce, Norm, Update, Transfer }

/// <summary>
/// <c>cluster.fault-injection = "step=5,phase=backward[,attempt=0][,worker=R][,action=kill]"</c>: throw in that
/// phase of that attempt (attempt 0 by default, so the redo succeeds) on worker rank R (any worker reaching
/// the phase by default), under plan epoch E when <c>epoch=E</c> is given (a re-plan after a loss redoes the
/// step at attempt 0 of a new epoch, where another worker may hold rank R); with <c>action=kill</c> the
/// process SIGKILLs itself there instead, with <c>action=crash</c> the actor fails as with a bug (it is
/// re-created in place), and <c>attempt=any</c> matches every attempt. Phase
/// <c>transfer</c> is a re-plan's unit transfer (step = the plan's first step, the worker its rank in the
/// plan before). For tests and benchmarks of abort-and-redo and of recovery.
/// </summary>
public sealed record FaultInjection(long Step, FaultPhase Phase, int Attempt, int? Worker, bool Kill = false, int? Epoch = null, bool Crash = false)
{
    /// <summary>
    /// <c>worker=coordinator</c>: the coordinator's process SIGKILLs itself (with <c>action=kill</c>, the only
    /// action it takes): in phase <c>forward</c> right after it started the step's attempt, in <c>update</c>
    /// once one stage applied the step's update and before any other was asked to. No worker matches it.
    /// For tests of coordinator fail-over.
    /// </summary>
    public bool Coordinator { get; init; }

    /// <summary>True when the coordinator is to kill its process in <paramref name="phase"/> of attempt <paramref name="fence"/>.</summary>
    public bool MatchesCoordinator(FaultPhase phase, Fence fence)
        => Coordinator && phase == Phase && fence.Step == Step && (Attempt == AnyAttempt || fence.Attempt == Attempt);

    /// <summary>The <see cref="Attempt"/> of <c>attempt=any</c>: every attempt of the step.</summary>
    public const int AnyAttempt = -1;

    public bool Matches(FaultPhase phase, Fence fence, int worker)
        => !Coordinator && phase == Phase && fence.Step == Step && (Attempt == AnyAttempt || fence.Attempt == Attempt) && (Worker is null || Worker == worker)
           && (Epoch is null || Epoch == fence.Epoch);

    /// <summary>
    /// The kill action: the whole process dies at once, as with `kill -9` (this is SIGKILL on Linux): no goodbye,
    /// no flush, sockets closed by the kernel. <paramref name="why"/> goes to stderr first. For fault tests and
    /// drills with node processes only.
    /// </summary>
    public static void KillThisProcess(string why)
    {
        Console.Error.WriteLine(why);
        System.Diagnostics.Process.GetCurrentProcess().Kill();
    }

    public static FaultInjection? Parse(string text)
    {
        if (string.IsNullOrWhiteSpace(text)) return null;
        long? step = null; FaultPhase? phase = null; int attempt = 0; int? worker = null; bool kill = false, crash = false, coordinator = false; int? epoch = null;
        foreach (var part in text.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
        {
            var kv = part.Split('=', 2, StringSplitOptions.TrimEntries);
            if (kv.Length != 2) throw new ConfigException($"cluster.fault-injection: '{part}' is not key=value");
            switch (kv[0])
            {
                case "step": step = long.TryParse(kv[1], out var s) && s >= 0 ? s : throw new ConfigException($"cluster.fault-injection: step '{kv[1]}' is not a step number"); break;
                case "phase":
                    phase = kv[1].ToLowerInvariant() switch
                    {
                        "forward" => FaultPhase.Forward, "dispatch" => FaultPhase.Dispatch, "backward" => FaultPhase.Backward,
                        "all-reduce" or "allreduce" => FaultPhase.AllReduce, "norm" => FaultPhase.Norm, "update" => FaultPhase.Update,
                        "transfer" => FaultPhase.Transfer,
                        _ => throw new ConfigException($"cluster.fault-injection: phase '{kv[1]}' is not one of forward, dispatch, backward, all-reduce, norm, update, transfer"),
                    };
                    break;
                case "attempt":
                    attempt = kv[1] == "any" ? AnyAttempt
                        : int.TryParse(kv[1], out var a) && a >= 0 ? a : throw new ConfigException($"cluster.fault-injection: attempt '{kv[1]}' is not a number or any");
                    break;
                case "worker" when kv[1] == "coordinator": coordinator = true; break;
                case "worker": worker = int.TryParse(kv[1], out var w) && w >= 0 ? w : throw new ConfigException($"cluster.fault-injection: worker '{kv[1]}' is not a rank or coordinator"); break;
                case "epoch": epoch = int.TryParse(kv[1], out var e) && e >= 0 ? e : throw new ConfigException($"cluster.fault-injection: epoch '{kv[1]}' is not a plan epoch"); break;
                case "action":
                    (kill, crash) = kv[1] switch
                    {
                        "kill" => (true, false), "crash" => (false, true), "throw" => (false, false),
                        _ => throw new ConfigException($"cluster.fault-injection: action '{kv[1]}' is not throw, crash or kill"),
                    };
                    break;
                default: throw new ConfigException($"cluster.fault-injection: unknown key '{kv[0]}' (step, phase, attempt, worker, action, epoch)");
            }
        }
        if (step is null || phase is null) throw new ConfigException("cluster.fault-injection needs step=N and phase=P");
        if (coordinator && (!kill || phase is not (FaultPhase.Forward or FaultPhase.Update)))
            throw new ConfigException("cluster.fault-injection: worker=coordinator takes action=kill in phase forward or update");
        return new FaultInjection(step.Value, phase.Value, attempt, worker, kill, epoch, crash) { Coordinator = coordinator };
    }
}
