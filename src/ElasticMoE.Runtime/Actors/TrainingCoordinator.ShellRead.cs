using Akka.Actor;
using Akka.Cluster;
using ElasticMoE.Planning;
using ElasticMoE.Runtime.Coordination;
using ElasticMoE.Runtime.Hosting;
using ElasticMoE.Runtime.Journal;
using ElasticMoE.Runtime.Protocol;

namespace ElasticMoE.Runtime.Actors;

// The coordinator's side of the shell's further read commands: experts heatmap, checkpoints verify, events,
// diagnose. Answered from the coordinator's state like the others; the two that need more than memory are not
// done on this thread: checkpoints verify reads files in a task whose result goes straight to the asker, events
// are the journal actor's to answer (it keeps them).
public sealed partial class TrainingCoordinator
{
    /// <summary>Diagnose calls a step in flight slow past this many median step times (and <see cref="SlowStepFloorSeconds"/>).</summary>
    private const double SlowStepFactor = 10;
    private const double SlowStepFloorSeconds = 30;

    // Each worker's own figures from its last StepComputed: compute time, process memory, thread budget.
    private readonly Dictionary<WorkerId, (long Step, double ComputeSeconds, long WorkingSet, int Threads)> _workerStats = new();

    private void NoteWorkerStats(StepComputed m)
    {
        if (_state.Plan is { } plan && m.Worker >= 0 && m.Worker < plan.WorldSize)
            _workerStats[plan.Workers[m.Worker].Id] = (m.Fence.Step, m.ComputeSeconds, m.WorkingSetBytes, m.Threads);
    }

    private ShellWorker WithStats(WorkerId id, ShellWorker row) => _workerStats.TryGetValue(id, out var s)
        ? row with { ComputeSeconds = s.ComputeSeconds, WorkingSetBytes = s.WorkingSet, Threads = s.Threads, StatsStep = s.Step }
        : row;

    private void ShellReadQueries()
    {
        Receive<ShellExpertHeatmapQuery>(_ => Sender.Tell(ShellHeatmapReply()));
        Receive<ShellCheckpointsVerifyQuery>(OnShellVerify);
        Receive<ShellEventsQuery>(m =>
        {
            if (_journal is null) Sender.Tell(new ShellError("no journal: the run was started without --run-dir"));
            else _journal.Forward(new GetJournalEvents(m.Since));
        });
        Receive<ShellDiagnoseQuery>(_ => Sender.Tell(ShellDiagnosisReply()));
    }

    private ShellExpertHeatmap ShellHeatmapReply()
    {
        // The rebalancer's window, from the same committed steps it is fed (a few longs per expert and step).
        var window = new Planning.ExpertLoadWindow(_config.Rebalance.Window);
        foreach (var m in Rebalancer.SeedFrom(_state.Committed, _config.Rebalance.Window)) window.Add(m.Step, m.Counts);
        if (window.Loads() is not { } sums) return new ShellExpertHeatmap(-1, 0, [], []);
        int n = window.Count;
        return new ShellExpertHeatmap(_state.Committed[^1].Step, n,
            sums.Select((_, o) => o + _config.Model.DenseLayers).ToArray(),
            sums.Select(layer => layer.Select(t => t / n).ToArray()).ToArray());
    }

    private void OnShellVerify(ShellCheckpointsVerifyQuery m)
    {
        if (_store is null)
        {
            Sender.Tell(new ShellError("no checkpoints: the run was started without --run-dir"));
            return;
        }
        // The list is read here (it is the coordinator's state); the files in a task, which answers the asker itself.
        var commits = _store.List().Where(c => m.Step < 0 || c.Step == m.Step).ToList();
        if (m.Step >= 0 && commits.Count == 0)
        {
            Sender.Tell(new ShellError($"no committed checkpoint of step {m.Step} (`checkpoints list` shows them)"));
            return;
        }
        var store = _store;
        Task.Run(() =>
        {
            var verdicts = commits.Select(c =>
            {
                string[] problems;
                try { problems = store.Verify(c).Select(p => p.ToString()).ToArray(); }
                catch (Exception ex) when (ex is IOException or UnauthorizedAccessException) { problems = [$"{c.Directory}: {ex.Message}"]; }
                return new ShellCheckpointVerdict(c.Step, c.Directory, problems.Length == 0, problems);
            }).ToArray();
            return (IElasticMoEMessage)new ShellCheckpointsVerified(store.Root, verdicts.All(v => v.Ok), verdicts);
        }).PipeTo(Sender);
    }

    private Dictionary<WorkerId, string> SlowWorkers(HashSet<WorkerId> planned) => StepOutliers.Find(
        _workerStats.Where(kv => planned.Contains(kv.Key)).Select(kv => (kv.Key, kv.Value.Step, kv.Value.ComputeSeconds)).ToList());

    private ShellDiagnosis ShellDiagnosisReply()
    {
        var cluster = Cluster.Get(Context.System).State;
        var unreachable = cluster.Unreachable.Select(m => m.Address.ToString()).ToHashSet();
        var members = cluster.Members.ToDictionary(m => m.Address.ToString());
        var workers = _state.Workers.Where(w => !_gone.Contains(w.Id)).ToList();
        var planned = _state.Plan?.Workers.Select(w => w.Id).ToHashSet() ?? [];
        var nodes = members.Keys.Concat(workers.Select(w => w.NodeAddress)).Distinct().Order(StringComparer.Ordinal);
        var outliers = SlowWorkers(planned);
        var health = nodes.Select(node =>
        {
            var fail = new List<string>();
            var slow = new List<string>();
            members.TryGetValue(node, out var member);
            var mine = workers.Where(w => w.NodeAddress == node).ToList();
            int inPlan = mine.Count(w => planned.Contains(w.Id));
            int data = mine.Count(w => !string.IsNullOrEmpty(w.DataEndpoint));
            if (member is null) fail.Add("registered with the run but not a cluster member");
            else
            {
                if (unreachable.Contains(node)) fail.Add("unreachable from the coordinator's node");
                // Joining (or WeaklyUp) is no fault: a node registers and trains before the leader moves it to Up.
                if (member.Status is not (MemberStatus.Up or MemberStatus.Joining or MemberStatus.WeaklyUp)) fail.Add($"cluster status {member.Status}");
                if (member.HasRole(ClusterNode.WorkerRole) && mine.Count == 0)
                    fail.Add("a worker node with no worker registered with the run (refused, or not registered)");
            }
            if (data < mine.Count) fail.Add($"{mine.Count - data} worker(s) without a data-plane endpoint");
            if (_state.Plan is not null && inPlan < mine.Count) slow.Add($"{mine.Count - inPlan} worker(s) not in the plan yet");
            foreach (var w in mine)
                if (outliers.TryGetValue(w.Id, out var why)) slow.Add(why);
            string verdict = fail.Count > 0 ? "fail" : slow.Count > 0 ? "slow" : "pass";
            return new ShellNodeHealth(node, verdict, member?.Status.ToString() ?? "absent",
                member?.Roles.Order(StringComparer.Ordinal).ToArray() ?? [], member is not null && !unreachable.Contains(node),
                mine.Count, inPlan, data, [.. fail, .. slow]);
        }).ToArray();

        var recent = _state.Committed.TakeLast(20).Select(c => c.Seconds).Order().ToList();
        double? median = recent.Count == 0 ? null : recent[recent.Count / 2];
        double? inFlight = _phase is Phase.Computing or Phase.Norms or Phase.Updating ? _stepClock.Elapsed.TotalSeconds : null;
        var runReasons = new List<string>();
        if (inFlight is { } t && median is { } med && t > Math.Max(SlowStepFloorSeconds, SlowStepFactor * med))
            runReasons.Add($"step {_state.NextStep + 1} has taken {t:F1} s so far (median step {med:F3} s)");
        string runVerdict = runReasons.Count > 0 ? "slow" : "pass";
        // Below its redundancy the run is at risk (a loss of the nodes holding the only copies costs state): not a pass.
        if (Redundancy()?.Describe() is { } risk)
        {
            runReasons.Add(risk);
            if (runVerdict == "pass") runVerdict = "risk";
        }
        string phase = _holding ? "paused" : _phase.ToString().ToLowerInvariant();
        return new ShellDiagnosis(runVerdict == "pass" && health.All(h => h.Verdict == "pass"), phase, _state.NextStep, inFlight, median,
            runVerdict, runReasons.ToArray(), health);
    }
}
