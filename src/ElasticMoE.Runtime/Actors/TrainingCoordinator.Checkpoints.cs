using Akka.Actor;
using ElasticMoE.Checkpointing;
using ElasticMoE.Planning;
using ElasticMoE.Runtime.Coordination;
using ElasticMoE.Runtime.Journal;
using ElasticMoE.Runtime.Protocol;
using ElasticMoE.State;
using ElasticMoE.Training;

namespace ElasticMoE.Runtime.Actors;

// The coordinator's durable side (with --run-dir): its events go to the journal (Akka.Persistence.Sql),
// a restarted coordinator recovers its state from there and resumes from the newest checkpoint that
// verifies, and checkpoints are written by the workers at step boundaries and committed by one event.
public sealed partial class TrainingCoordinator
{
    /// <summary>Persistence id of the run's coordinator journal: one run per run directory (or database).</summary>
    public const string JournalId = "elasticmoe-coordinator";

    private readonly string? _runDir;
    private readonly bool _standby;
    private IActorRef? _journal;
    private long _journalRequests;
    private CheckpointStore? _store;
    private ResumeFrom? _resume;

    private sealed record ResumeLoaded(ResumeFrom? From, IReadOnlyList<string> Warnings, string? Error);
    private sealed record ManifestWritten(long Step, CheckpointCommit? Commit, string? Error);
    private sealed record RetiredDeleted(long Step, string? Error);

    /// <summary>A checkpoint being written: who writes what, what has been copied and written so far.</summary>
    private sealed class CheckpointInFlight(long step, string directory, IReadOnlyCollection<string> writers)
    {
        public long Step { get; } = step;
        public string Directory { get; } = directory;
        public HashSet<string> Writers { get; } = writers.ToHashSet();
        public HashSet<string> Copied { get; } = new();
        public List<ShardInfo> Shards { get; } = new();
        public System.Diagnostics.Stopwatch Clock { get; } = System.Diagnostics.Stopwatch.StartNew();
        /// <summary>How long an update or install waited for this checkpoint's copies (usually 0: they overlap compute).</summary>
        public double StallSeconds { get; set; }
        public long CommitRequest { get; set; } = -1;
    }

    private CheckpointInFlight? _writing;
    // Retired checkpoints (journaled or being journaled) until their files are deleted.
    private readonly Dictionary<long, CheckpointCommitted> _retiring = new();
    private readonly HashSet<long> _deleting = new();

    /// <summary>A checkpoint being written or an old one being deleted: the run ends after them.</summary>
    private bool CheckpointWorkPending => _writing is not null || _retiring.Count > 0;
    private bool _completeWhenWritten;
    private readonly System.Diagnostics.Stopwatch _sinceCheckpoint = System.Diagnostics.Stopwatch.StartNew();

    // ---- journal -------------------------------------------------------------------------------

    private void StartJournal()
    {
        _store = new CheckpointStore(_runDir!, new JournalCommitLog(() => _state.Checkpoints), keep: int.MaxValue);
        _journal = Context.ActorOf(CoordinatorJournal.Props(JournalId, Self, snapshotEvery: 200), "journal");
        Context.Watch(_journal);
    }

    private void Recovering()
    {
        Receive<JournalRecovered>(OnJournalRecovered);
        Receive<ResumeLoaded>(OnResumeLoaded);
        Receive<JournalFailed>(m => Fail($"the coordinator journal cannot be read: {m.Reason}", FailureKind.StateLost, m.Cause));
        Receive<Terminated>(m => Fail("the coordinator journal stopped", FailureKind.StateLost));
        ReceiveAny(_ => Stash.Stash());
    }

    private void OnJournalRecovered(JournalRecovered m)
    {
        _state = m.State;
        SeedRebalancer();
        if (_state.RunFingerprint is null)
        {
            Apply(new RunStarted(_runFingerprint, _config.Seed, 0));
            _report.Info($"run directory {_runDir}: a new run (journal and checkpoints start here)");
            BeginWaitingForNodes();
            return;
        }
        if (_standby && _state.Ended is { } how)
        {
            // The coordinator this one stood by for ended the run and left: nothing to take over.
            _report.Info($"the run in {_runDir} has ended ({how}) at step {_state.NextStep}; this stand-by coordinator has nothing to take over");
            _finished = true;
            _done.TrySetResult(new RunResult(_state.Committed, [], 0, new Dictionary<string, (double, double)>()));
            Enter(Phase.Done, Done);
            return;
        }
        if (_state.RunFingerprint != _runFingerprint)
        {
            Fail($"run directory {_runDir} holds another run: " + string.Join("; ", TrainingState.RunFingerprintDifferences(_runFingerprint, _state.RunFingerprint)) +
                 "; use a new --run-dir, or the settings of that run", FailureKind.Error);
            return;
        }
        _report.Info($"run directory {_runDir}: resuming a run with {_state.NextStep} committed step(s) and {_state.Checkpoints.Count} checkpoint(s) in its journal");
        var store = _store!;
        Task.Run(() =>
        {
            try
            {
                var load = store.LoadNewestValid();
                var from = load.Checkpoint is { } c ? new ResumeFrom(c.Directory, c.Commit.ManifestSha256, c.Step) : null;
                return new ResumeLoaded(from, load.Warnings, null);
            }
            catch (Exception ex)
            {
                return new ResumeLoaded(null, [], ex.Message);
            }
        }).PipeTo(Self);
    }

    private void OnResumeLoaded(ResumeLoaded m)
    {
        foreach (var w in m.Warnings) _report.Info($"warning: {w}");
        if (m.Error is not null)
        {
            Fail($"cannot resume from {_runDir}: {m.Error}", FailureKind.StateLost);
            return;
        }
        _resume = m.From;
        if (_state.Plan is { } prior)
        {
            // Nodes of the previous coordinator may still be running with the units of this plan in memory,
            // newer than any checkpoint: decide when the nodes have registered (DecideReattach).
            _priorPlan = prior;
            _lastEpoch = Math.Max(_lastEpoch, prior.Epoch);
            Apply(new CoordinatorRestarted(_state.NextStep));
            _report.Info($"waiting for nodes: those that kept plan {prior.Epoch}'s units in memory are re-attached, " +
                         $"else the run resumes from {(m.From is null ? "step 0 (no checkpoint committed)" : $"checkpoint {Path.GetFileName(m.From.Directory)} (step {m.From.Step})")}");
        }
        else ResumeFromCheckpoint();
        BeginWaitingForNodes();
    }

    private void ResumeFromCheckpoint()
    {
        long step = _resume?.Step ?? 0;
        Apply(new RunResumed(step));
        _report.Info(_resume is null
            ? "no checkpoint was committed: the run starts again from step 0"
            : $"resuming from checkpoint {Path.GetFileName(_resume.Directory)} (step {step}); it loads on whatever nodes join, in any layout");
    }

    // ---- re-attaching the nodes of a coordinator that died ----------------------------------------

    // The journal's last plan when this coordinator restarted a run, until the decision; and what each
    // registered node said it still holds.
    private TrainingPlan? _priorPlan;
    private readonly Dictionary<string, HeldUnits[]> _heldByNode = new();

    private void NoteHeld(RegisterNode m)
    {
        if (m.Held.Length == 0) return;
        _heldByNode[m.NodeAddress] = m.Held;
        // The next plans must be newer than any attempt these workers saw, or they would drop their messages as stale.
        _lastEpoch = Math.Max(_lastEpoch, m.Held.Max(h => h.LastEpoch));
    }

    /// <summary>
    /// With every expected node registered: adopt the units the returning nodes hold when they agree with
    /// the journal (<see cref="Reattachment.Decide"/>), else resume from the last committed checkpoint.
    /// Then plan as usual (the adopted plan is the previous one: units stay where they are).
    /// </summary>
    private void DecideReattach()
    {
        var prior = _priorPlan!;
        _priorPlan = null;
        var held = new List<HeldWorker>();
        foreach (var (address, list) in _heldByNode)
            foreach (var h in list)
            {
                var slot = _state.Workers.FirstOrDefault(w => w.NodeAddress == address && w.Device == h.Device);
                if (slot is null) continue;   // the node is gone again
                held.Add(new HeldWorker(new WorkerId(h.Previous.NodeAddress, h.Previous.SystemUid, h.Previous.Device), slot, h.Epoch,
                    h.Units.Select((u, i) => (UnitId.Parse(u), h.AppliedSteps[i], h.Checksums[i])).ToList()));
            }
        _heldByNode.Clear();
        var decision = Reattachment.Decide(prior, _state.NextStep, held, _config.Model);
        if (decision.Adopt)
        {
            Apply(new WorkersAdopted(decision.NextStep, decision.Plan!));
            _gone.UnionWith(decision.Gone);
            _resume = null;
            _report.Info($"re-attached: {decision.Why}; training on from step {decision.NextStep} with the units in the nodes' memory");
            int workers = WorkersStaying;
            Replan(workers, PipelineDegreeFor(workers, decision.Plan!.Pp));
            return;
        }
        // RunResumed forgets the registered workers with the old plan: record them again.
        if (held.Count > 0) _report.Info($"warning: the nodes' units in memory are not used: {decision.Why}");
        var registered = _state.Workers;
        ResumeFromCheckpoint();
        foreach (var node in registered.GroupBy(w => (w.NodeAddress, w.Id.SystemUid)))
            Apply(new NodeJoined(node.Key.NodeAddress, node.Key.SystemUid, node.ToList()));
        Replan(_state.Workers.Count, _config.Cluster.PipelineStages);
    }

    // ---- rolling back in place ---------------------------------------------------------------------

    private sealed record RollbackLoaded(ResumeFrom? From, IReadOnlyList<string> Warnings, string? Error);

    /// <summary>A rollback in place, from its decision to the first step committed after it (its metrics line).</summary>
    private sealed class RollbackInFlight(long fromStep, IReadOnlyList<UnitId> lost, int pp, System.Diagnostics.Stopwatch since)
    {
        public long FromStep { get; } = fromStep;
        public IReadOnlyList<UnitId> Lost { get; } = lost;
        /// <summary>The pipeline degree of the plan that was lost: the rollback's plan keeps it if it still fits.</summary>
        public int Pp { get; } = pp;
        /// <summary>From the loss that caused it (its node-lost event's clock) to the first step committed after it.</summary>
        public System.Diagnostics.Stopwatch Since { get; } = since;
        public long? ToStep { get; set; }
    }

    private RollbackInFlight? _rollback;

    /// <summary>
    /// A loss left <paramref name="lost"/>'s units with no copy in memory. With a run directory that has a committed
    /// checkpoint, the run goes back to the newest one that verifies, in place: no process restarts, the nodes present
    /// stay, the next plan loads that checkpoint's units into them (as a resume does), and the steps since are done
    /// again — to the same bits, since every sum is in the canonical order. False (nothing begun) without one.
    /// </summary>
    private bool TryRollBack(UnitsLostException lost, int pp)
    {
        if (_store is null || _state.Checkpoints.Count == 0) return false;
        // A second loss while a rollback's plan installs: the same rollback carries on (its checkpoint is loaded again).
        var since = _rollback?.Since ?? _membershipEvents.LastOrDefault()?.Since ?? System.Diagnostics.Stopwatch.StartNew();
        _rollback = new RollbackInFlight(_rollback?.FromStep ?? _state.NextStep, lost.Units, pp, since);
        _report.Info($"{lost.Message}; rolling back in place to the newest checkpoint that verifies (of {_state.Checkpoints.Count} committed)");
        var store = _store;
        Task.Run(() =>
        {
            try
            {
                var load = store.LoadNewestValid();
                var from = load.Checkpoint is { } c ? new ResumeFrom(c.Directory, c.Commit.ManifestSha256, c.Step) : null;
                return new RollbackLoaded(from, load.Warnings, from is null ? "no committed checkpoint verifies" : null);
            }
            catch (Exception ex)
            {
                return new RollbackLoaded(null, [], ex.Message);
            }
        }).PipeTo(Self);
        Enter(Phase.RollingBack, RollingBack);
        return true;
    }

    private void RollingBack()
    {
        Receive<RollbackLoaded>(OnRollbackLoaded);
        Common();
    }

    private void OnRollbackLoaded(RollbackLoaded m)
    {
        foreach (var w in m.Warnings) _report.Info($"warning: {w}");
        var rb = _rollback!;
        if (m.From is not { } from)
        {
            Fail($"cannot roll back after losing {string.Join(", ", rb.Lost)}: {m.Error}", FailureKind.StateLost);
            return;
        }
        // Journaled before anything loads: after a crash from here on, the run resumes from that checkpoint too.
        Apply(new RolledBack(rb.FromStep, from.Step, rb.Lost.Select(u => u.ToString()).ToArray()));
        rb.ToStep = from.Step;
        _resume = from;
        _gone.Clear();   // nothing moves from the lost plan: every unit comes from the checkpoint
        _afterInstall = AfterInstall.Step;   // an evaluation or the end that was due comes again at its step
        _report.Info($"rolled back: steps {from.Step + 1}..{rb.FromStep} are done again from checkpoint {Path.GetFileName(from.Directory)} " +
                     $"on the {WorkersStaying} worker(s) present");
        Recover();
    }

    /// <summary>At the first step committed after a rollback: its metrics line (recovery from the loss to this commit).</summary>
    private void ReportRollback()
    {
        if (_rollback is not { ToStep: { } to } rb) return;
        _rollback = null;
        _report.RollbackEvent(rb.FromStep + 1, to, rb.Lost.Select(u => u.ToString()).ToList(), rb.Since.Elapsed.TotalSeconds);
    }

    /// <summary>Why a loss of every copy of some units ends the run: what would have let it roll back instead.</summary>
    private string WhyNoRollback()
    {
        if (_runDir is null)
            return "the run cannot go on without a checkpoint: with --run-dir (checkpoints every checkpoint.every steps) it would have rolled back to the last one in place";
        var c = _config.Checkpoint;
        return c.Every > 0 || c.EverySeconds > 0
            ? $"no checkpoint is committed in {_runDir} yet (checkpoint.every = {c.Every}, checkpoint.every-seconds = {c.EverySeconds:F0}), so there is nothing to roll back to"
            : $"checkpoints are off (checkpoint.every = 0), so {_runDir} has nothing to roll back to";
    }

    private void BeginWaitingForNodes()
    {
        Stash.UnstashAll();
        Enter(Phase.WaitingForNodes, WaitingForNodes);
    }

    // Events the journal answered: a checkpoint's commit point, a retirement to carry out, or a refusal.
    private void JournalReplies()
    {
        Receive<EventsAppended>(OnEventsAppended);
        Receive<AppendRefused>(m => Fail($"the coordinator journal refused an event: {m.Reason}", FailureKind.StateLost));
        Receive<JournalFailed>(m => Fail($"the coordinator journal failed: {m.Reason}", FailureKind.StateLost, m.Cause));
        Receive<Terminated>(m => { if (m.ActorRef.Equals(_journal)) Fail("the coordinator journal stopped", FailureKind.StateLost); });
        Receive<CheckpointCopied>(OnCheckpointCopied);
        Receive<CheckpointShardWritten>(OnShardWritten);
        Receive<ManifestWritten>(OnManifestWritten);
        Receive<RetiredDeleted>(m =>
        {
            _retiring.Remove(m.Step);
            if (m.Error is not null) _report.Info($"warning: could not delete retired checkpoint of step {m.Step}: {m.Error}");
            if (_completeWhenWritten && !CheckpointWorkPending) Complete();
        });
    }

    private long Journal(ICoordinatorEvent e)
    {
        if (_journal is null) return -1;
        long id = ++_journalRequests;
        _journal.Tell(new AppendEvents(id, [e]));
        return id;
    }

    // ---- writing checkpoints -------------------------------------------------------------------

    private bool CheckpointDue(long done, bool last)
    {
        if (_store is null || _gone.Count > 0) return false;
        var c = _config.Checkpoint;
        return last || (c.Every > 0 && done % c.Every == 0) || (c.EverySeconds > 0 && _sinceCheckpoint.Elapsed.TotalSeconds >= c.EverySeconds);
    }

    /// <summary>
    /// At the boundary after step <paramref name="step"/>: every writer is told to copy its share to host
    /// memory and write it in the background, and <paramref name="then"/> (the next step, or the evaluation)
    /// runs at once. Nothing of the next step changes a unit before its update, so the copies only have to
    /// be done before that (<see cref="AfterCopies"/>): a copy (2 ms here) overlaps the next step's compute
    /// (300 ms), and the only stall is an update that would come first. Waiting for the copies before the
    /// next step instead cost 7 % of a step here (P5: median 22 ms, the round trip to the nodes).
    /// </summary>
    private void BeginCheckpoint(long step, Action then)
    {
        if (_writing is not null)
        {
            _report.Info($"checkpoint of step {step} skipped: the one of step {_writing.Step} is still being written");
            then();
            return;
        }
        string directory;
        try
        {
            directory = _store!.BeginSave(step);
        }
        catch (Exception ex)
        {
            _report.Info($"warning: checkpoint of step {step} not started: {ex.Message}");
            then();
            return;
        }
        var plan = _state.Plan!;
        var held = Enumerable.Range(0, plan.WorldSize)
            .ToDictionary(r => $"w{r}", r => (IReadOnlyCollection<UnitId>)plan.UnitsOf(r, _config.Model).ToList());
        var writers = CheckpointWriters.Assign(held);
        _writing = new CheckpointInFlight(step, directory, writers.Keys.ToList());
        _sinceCheckpoint.Restart();
        foreach (var (writer, units) in writers)
            _workerRefs[int.Parse(writer.AsSpan(1), System.Globalization.CultureInfo.InvariantCulture)]
                .Tell(new WriteCheckpoint(step, directory, writer, units.Select(u => u.ToString()).ToArray()));
        Timers.StartSingleTimer("copy", new PhaseTimeout(new Fence(_state.Epoch, step, -4), "checkpoint copy"),
            TimeSpan.FromSeconds(_config.Cluster.StepTimeoutSeconds));
        then();
    }

    // What must not run before every writer has its copy: an update or an install changes units.
    private Action? _afterCopies;
    private System.Diagnostics.Stopwatch? _copyWait;

    private bool CopiesPending => _writing is { } w && w.Copied.Count < w.Writers.Count;

    /// <summary>Runs <paramref name="action"/> now, or once every writer has copied its units (true: deferred).</summary>
    private bool AfterCopies(Action action)
    {
        if (!CopiesPending) return false;
        _afterCopies = action;
        _copyWait = System.Diagnostics.Stopwatch.StartNew();
        return true;
    }

    private void OnCheckpointCopied(CheckpointCopied m)
    {
        if (_writing is not { } w || m.Step != w.Step) return;
        if (m.Error is not null)
        {
            AbandonCheckpoint($"writer {m.Writer} could not copy its units: {m.Error}");
            return;
        }
        if (w.Copied.Add(m.Writer) && w.Copied.Count == w.Writers.Count)
        {
            Timers.Cancel("copy");
            w.StallSeconds = _copyWait?.Elapsed.TotalSeconds ?? 0;
            RunAfterCopies();
        }
    }

    private void RunAfterCopies()
    {
        var action = _afterCopies;
        _afterCopies = null;
        _copyWait = null;
        action?.Invoke();
    }

    /// <summary>Gives up the checkpoint in flight (its directory stays uncommitted and is cleaned up by the next save of that step).</summary>
    private void AbandonCheckpoint(string why)
    {
        if (_writing is not { } w) return;
        _report.Info($"warning: checkpoint of step {w.Step} abandoned: {why}");
        _writing = null;
        Timers.Cancel("copy");
        RunAfterCopies();
        if (_completeWhenWritten && !CheckpointWorkPending) Complete();
    }

    private void OnShardWritten(CheckpointShardWritten m)
    {
        if (_writing is not { } w || m.Step != w.Step || !w.Writers.Contains(m.Writer)) return;
        if (m.Error is not null)
        {
            AbandonCheckpoint($"writer {m.Writer} could not write its shard: {m.Error}");
            return;
        }
        w.Shards.Add(new ShardInfo(m.File, m.Bytes, m.Sha256, m.Units.Select(UnitId.Parse).ToList()));
        if (w.Shards.Count < w.Writers.Count) return;
        var store = _store!;
        var plan = _state.Plan!;
        var layout = new Dictionary<string, string>
        {
            ["mode"] = "cluster", ["epoch"] = plan.Epoch.ToString(System.Globalization.CultureInfo.InvariantCulture),
            ["layout"] = $"{plan.Dp}x{plan.Pp}", ["workers"] = string.Join(",", plan.Workers.Select(x => x.Id.ToString())),
        };
        string model = TrainingState.Fingerprint(_config.Model);
        var shards = w.Shards.ToList();
        Task.Run(() =>
        {
            try
            {
                return new ManifestWritten(w.Step, store.Commit(w.Directory, w.Step, _runFingerprint, model, layout, shards), null);
            }
            catch (Exception ex)
            {
                return new ManifestWritten(w.Step, null, ex.Message);
            }
        }).PipeTo(Self);
    }

    // Every shard is durable and the manifest written: the journal event is the commit point.
    private void OnManifestWritten(ManifestWritten m)
    {
        if (_writing is not { } w || m.Step != w.Step) return;
        if (m.Error is not null)
        {
            AbandonCheckpoint($"manifest not written: {m.Error}");
            return;
        }
        var c = m.Commit!;
        var committed = new CheckpointCommitted(c.Step, c.ManifestSha256,
            w.Shards.Select(s => new Coordination.CheckpointFile($"{c.Directory}/{s.File}", s.Bytes, s.Sha256)).ToList());
        w.CommitRequest = Journal(committed);
        _state = _state.Apply(committed);
        if (_journal is null) OnCheckpointDurable(w);
    }

    private void OnEventsAppended(EventsAppended m)
    {
        if (_writing is { } w && m.RequestId == w.CommitRequest) OnCheckpointDurable(w);
        foreach (var (step, retired) in _retiring.ToList())
            if (!_deleting.Contains(step) && m.State.Checkpoints.All(c => c.ManifestSha256 != retired.ManifestSha256))
            {
                _deleting.Add(step);
                var dir = Path.Combine(_runDir!, DirectoryOf(retired));
                var index = new FileCommitLog(Path.Combine(_runDir!, FileCommitLog.FileName));
                var commit = ToCommit(retired);
                Task.Run(() =>
                {
                    try
                    {
                        index.AppendRetired(commit);
                        if (Directory.Exists(dir)) Directory.Delete(dir, recursive: true);
                        return new RetiredDeleted(step, null);
                    }
                    catch (Exception ex)
                    {
                        return new RetiredDeleted(step, ex.Message);
                    }
                }).PipeTo(Self);
            }
    }

    private void OnCheckpointDurable(CheckpointInFlight w)
    {
        _writing = null;
        long bytes = w.Shards.Sum(s => s.Bytes);
        Observability.RunMetrics.CheckpointStall(w.StallSeconds);
        _report.Info(System.FormattableString.Invariant(
            $"checkpoint of step {w.Step} committed: {w.Shards.Count} shard(s), {bytes / 1048576.0:F1} MiB, training paused {w.StallSeconds * 1000:F0} ms, written in {w.Clock.Elapsed.TotalSeconds:F2} s"));
        // commits.log: an index for the `checkpoints` commands; the journal event above is the commit.
        var index = new FileCommitLog(Path.Combine(_runDir!, FileCommitLog.FileName));
        var commit = ToCommit(_state.Checkpoints[^1]);
        try { index.AppendCommitted(commit); }
        catch (Exception ex) { _report.Info($"warning: {FileCommitLog.FileName} not updated: {ex.Message}"); }
        // Retention: older checkpoints go only now that a newer one is committed; the retirement is journaled first.
        int extra = _state.Checkpoints.Count - _config.Checkpoint.Keep;
        foreach (var old in _state.Checkpoints.Take(Math.Max(0, extra)).ToList())
        {
            Apply(new CheckpointRetired(old.Step, old.ManifestSha256));
            _retiring[old.Step] = old;
        }
        if (_completeWhenWritten && !CheckpointWorkPending) Complete();
    }

    private static string DirectoryOf(CheckpointCommitted c) => c.Files.Count == 0 ? CheckpointStore.DirectoryName(c.Step) : c.Files[0].Path.Split('/')[0];

    private static CheckpointCommit ToCommit(CheckpointCommitted c)
        => new(c.Step, DirectoryOf(c), c.ManifestSha256, c.Files.Select(f => f.Path[(f.Path.IndexOf('/') + 1)..]).Order(StringComparer.Ordinal).ToList());

    /// <summary>The journal's committed checkpoints as the checkpoint store's commit log (read only: the coordinator journals commits itself).</summary>
    private sealed class JournalCommitLog(Func<IReadOnlyList<CheckpointCommitted>> committed) : ICheckpointCommitLog
    {
        // The coordinator appends the journal event after Commit returns; nothing to do here.
        public void AppendCommitted(CheckpointCommit commit) { }

        public void AppendRetired(CheckpointCommit commit)
            => throw new InvalidOperationException("retention of cluster checkpoints goes through the coordinator journal");

        public CommitLogContents Read() => new(committed().Select(ToCommit).ToList(), []);
    }
}
