using System.Security.Cryptography;
using System.Text;
using Akka.Actor;
using ElasticMoE.Runtime.Protocol;

namespace ElasticMoE.Runtime.Actors;

// The coordinator's side of the actor shell (`elasticmoe shell`, through the ShellEndpoint of its node):
// queries answered at once from the coordinator's state, whatever the phase (no step is waited for), and
// the control commands pause, resume, stop and checkpoint-now, each only with the shell token.
public sealed partial class TrainingCoordinator
{
    /// <summary>HOCON key of the shell token; empty (the default) = control commands disabled.</summary>
    public const string ShellTokenKey = "elasticmoe.shell.token";

    /// <summary>Environment variable that sets the shell token on the coordinator's side (wins over HOCON).</summary>
    public const string ShellTokenVariable = "ELASTICMOE_SHELL_TOKEN";

    // `train pause`: no new step starts (the one in flight finishes). _holding: a step boundary was
    // reached while paused, so `train resume` must start the next step itself.
    private bool _paused;
    private bool _holding;
    // `checkpoint now`: taken at the next step boundary (or at once when paused there).
    private bool _checkpointAsked;

    private void ShellQueries()
    {
        Receive<ShellWorkersQuery>(_ => Sender.Tell(ShellWorkersReply()));
        Receive<ShellPlanQuery>(_ => Sender.Tell(ShellPlanReply()));
        Receive<ShellTrainStatusQuery>(_ => Sender.Tell(ShellStatusReply()));
        Receive<ShellExpertLoadsQuery>(m => Sender.Tell(ShellLoadsReply(m.Layer)));
        Receive<ShellCheckpointsQuery>(_ => Sender.Tell(new ShellCheckpoints(
            _state.Checkpoints.Select(c => new ShellCheckpoint(c.Step, c.ManifestSha256, c.Files.Count, c.Files.Sum(f => f.Length))).ToArray(), _runDir)));
        Receive<ShellControl>(m => Sender.Tell(Journaled(m.Action, [], OnShellControl(m))));
        // A stop while held at a boundary: Common's StopRun waits for a step in flight, and none is coming.
        Receive<StopRun>(m =>
        {
            _stopRequested ??= m.Reason;
            ReleaseHold();
        }, _ => _holding && !_finished);
    }

    /// <summary>
    /// Called by StartStepOrFinish just before a step starts (no step in flight, the plan installed): takes
    /// a checkpoint asked for by the shell, and holds the run there while paused. True: do not start the step.
    /// </summary>
    private bool HoldAtBoundary()
    {
        if (_checkpointAsked)
        {
            _checkpointAsked = false;
            BeginCheckpoint(_state.NextStep, () => { });
        }
        if (!_paused) return false;
        if (!_holding) _report.Info($"paused before step {_state.NextStep + 1} (train pause); train resume continues");
        _holding = true;
        // A phase in which a loss re-plans and comes back here (LoseWorkers: no attempt is in flight).
        Enter(Phase.WaitingForWorkers, Common);
        return true;
    }

    private void ReleaseHold()
    {
        if (!_holding) return;
        _holding = false;
        StartStepOrFinish();
    }

    private ShellAck OnShellControl(ShellControl m)
    {
        if (!ShellTokenAccepted(m.Token, out var refusal)) return new ShellAck(false, refusal);
        if (_finished) return new ShellAck(false, $"the run has ended (after step {_state.NextStep})");
        switch (m.Action)
        {
            case "pause":
                if (_paused) return new ShellAck(true, _holding ? $"already paused before step {_state.NextStep + 1}" : "already pausing after the step in flight");
                _paused = true;
                _report.Info("pause requested from the shell");
                if (_phase is Phase.Retrying or Phase.Computing or Phase.Norms or Phase.Updating or Phase.Evaluating or Phase.Installing)
                    return new ShellAck(true, $"pausing after step {_state.NextStep + 1} (in flight)");
                return new ShellAck(true, $"paused before step {_state.NextStep + 1}");
            case "resume":
                if (!_paused) return new ShellAck(true, "not paused");
                _paused = false;
                _report.Info($"resumed from the shell before step {_state.NextStep + 1}");
                ReleaseHold();
                return new ShellAck(true, $"resumed at step {_state.NextStep + 1}");
            case "stop":
                Self.Tell(new StopRun("stopped from the shell"));
                return new ShellAck(true, _holding ? $"stopping (paused before step {_state.NextStep + 1})" : $"stopping after the step in flight (step {_state.NextStep + 1})");
            case "checkpoint":
                if (_store is null) return new ShellAck(false, "this run keeps no checkpoints: start it with --run-dir DIR");
                if (_state.Plan is null) return new ShellAck(false, "no plan is installed yet: nothing to checkpoint");
                if (_holding)
                {
                    BeginCheckpoint(_state.NextStep, () => { });
                    return new ShellAck(true, $"checkpoint of step {_state.NextStep} started (paused); `checkpoints list` shows it once committed");
                }
                _checkpointAsked = true;
                return new ShellAck(true, $"checkpoint at the next step boundary (after step {_state.NextStep + 1}); `checkpoints list` shows it once committed");
            case "rebalance":
                if (RebalanceRefusal() is { } why) return new ShellAck(false, $"cannot rebalance now: {why}");
                _report.Info("rebalance requested from the shell");
                if (_holding)
                {
                    // Paused at a boundary: re-plan now; the run holds again once the plan is installed.
                    _holding = false;
                    _rebalanceAsked = true;
                    StartStepOrFinish();
                    return new ShellAck(true, "rebalance carried out at this boundary (paused)");
                }
                if (_rebalanceAsked) return new ShellAck(true, "a rebalance is already requested for the next step boundary");
                _rebalanceAsked = true;
                return new ShellAck(true, $"rebalance at the next step boundary (after step {_state.NextStep + 1}); a metrics line and `plan` show it");
            default:
                return new ShellAck(false, $"unknown control command '{m.Action}'");
        }
    }

    /// <summary>The token from <see cref="ShellTokenVariable"/>, else <see cref="ShellTokenKey"/>; compared in constant time.</summary>
    private bool ShellTokenAccepted(string given, out string refusal)
    {
        var expected = Environment.GetEnvironmentVariable(ShellTokenVariable);
        if (string.IsNullOrEmpty(expected))
            expected = _config.Raw.HasPath(ShellTokenKey) ? _config.Raw.GetString(ShellTokenKey, "") : "";
        refusal = "";
        if (string.IsNullOrEmpty(expected))
        {
            refusal = $"refused: control commands are disabled on this coordinator (set {ShellTokenKey} or {ShellTokenVariable} there)";
            return false;
        }
        if (CryptographicOperations.FixedTimeEquals(SHA256.HashData(Encoding.UTF8.GetBytes(given ?? "")), SHA256.HashData(Encoding.UTF8.GetBytes(expected))))
            return true;
        refusal = string.IsNullOrEmpty(given)
            ? $"refused: control commands need the shell token (--token T or {ShellTokenVariable})"
            : "refused: wrong shell token";
        _report.Info($"shell control command refused: {(string.IsNullOrEmpty(given) ? "no token" : "wrong token")}");
        return false;
    }

    private ShellWorkers ShellWorkersReply()
    {
        var plan = _state.Plan;
        var rows = _state.Workers.Select(w => WithStats(w.Id, Row(w))).OrderBy(w => w.Rank < 0).ThenBy(w => w.Rank)
            .ThenBy(w => w.Node, StringComparer.Ordinal).ThenBy(w => w.Device).ToArray();
        return new ShellWorkers(rows, _state.Committed.Count > 0 ? _state.Committed[^1].Seconds : 0);

        ShellWorker Row(Planning.WorkerSlot w)
        {
            int rank = plan?.RankOf(w.Id) ?? -1;
            if (plan is null || rank < 0)
                return new ShellWorker(w.NodeAddress, w.Id.SystemUid, w.Device, w.DataEndpoint, -1, -1, -1, "", 0, 0, _leaving.ContainsKey(w.NodeAddress));
            var stage = plan.Stages[plan.StageOf(rank)];
            int experts = Enumerable.Range(0, plan.ExpertOwner.Length).Sum(o => plan.ExpertsOn(o, rank).Length);
            return new ShellWorker(w.NodeAddress, w.Id.SystemUid, w.Device, w.DataEndpoint, rank, plan.StageOf(rank), plan.ReplicaOf(rank),
                $"[{stage.First},{stage.End})", experts, plan.UnitsOf(rank, _config.Model).Count(), _leaving.ContainsKey(w.NodeAddress));
        }
    }

    private ShellPlan ShellPlanReply()
    {
        if (_state.Plan is not { } plan) return new ShellPlan(0, 0, 0, 0, 0, 0, [], [], []);
        var stages = plan.Stages.Select((s, i) => new ShellStage(i, s.First, s.End,
            Enumerable.Range(0, plan.WorldSize).Where(r => plan.StageOf(r) == i).ToArray())).ToArray();
        var experts = plan.ExpertOwner.Select((owners, o) => new ShellExpertPlacement(o + _config.Model.DenseLayers, owners.ToArray(),
            owners.Select(r => plan.BuddyOf(r)).ToArray())).ToArray();
        long atStep = _plans.Count > 0 && _plans[^1].Epoch == plan.Epoch ? _plans[^1].AtStep : _state.NextStep;
        return new ShellPlan(plan.Epoch, plan.Dp, plan.Pp, plan.WorldSize, atStep, plan.Redundancy, stages,
            plan.Workers.Select(w => w.Id.ToString()).ToArray(), experts);
    }

    private ShellTrainStatus ShellStatusReply()
    {
        var last = _state.Committed.Count > 0 ? _state.Committed[^1] : null;
        long total = _config.Train.Steps;
        double elapsed = _clock.Elapsed.TotalSeconds;
        // At the mean time of the last 20 steps (a pause does not count).
        double? eta = last is null ? null : Math.Max(0, total - _state.NextStep) * _state.Committed.TakeLast(20).Average(c => c.Seconds);
        var (valStep, valLoss) = _validation.Count > 0 ? _validation[^1] : ((long?)null, (double?)null);
        string phase = _holding ? "paused" : _paused && !_finished ? "pausing" : _phase.ToString().ToLowerInvariant();
        return new ShellTrainStatus(_state.NextStep, total, last?.Loss, valLoss, valStep, last?.TokensPerSecond, eta, _redone, _plans.Count,
            phase, _paused, elapsed, _state.Plan?.WorldSize ?? 0, _stopRequested) { BelowRedundancy = Redundancy()?.Describe() };
    }

    private ShellExpertLoads ShellLoadsReply(int layer)
    {
        if (_state.Committed.Count == 0) return new ShellExpertLoads(-1, []);
        var last = _state.Committed[^1];
        var layers = last.ExpertCounts.Select((counts, o) =>
        {
            double mean = counts.Length == 0 ? 0 : counts.Average();
            return new ShellLayerLoads(o + _config.Model.DenseLayers, counts.ToArray(), mean > 0 ? counts.Max() / mean : 0);
        }).Where(l => layer < 0 || l.Layer == layer).ToArray();
        return new ShellExpertLoads(last.Step, layers);
    }
}
