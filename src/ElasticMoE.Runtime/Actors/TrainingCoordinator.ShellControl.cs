using Akka.Actor;
using ElasticMoE.Planning;
using ElasticMoE.Runtime.Coordination;
using ElasticMoE.Runtime.Protocol;

namespace ElasticMoE.Runtime.Actors;

// The shell's control commands with arguments: relayout, node leave, node down, fault kill-worker. Each needs
// the shell token, is checked before it is accepted (a refusal changes nothing), is journaled once accepted
// (ShellCommandIssued, as the other control commands are), and is carried out with the machinery that already
// does the same thing: a relayout is the RequestRelayout re-plan, a leave is a node's own hand-over (what its
// SIGTERM does), a down is a lost node's recovery, a kill is cluster.fault-injection's action=kill. All of it
// happens at a step boundary: at once when the run is held there (train pause), else at the next one; a
// recovery or a re-plan in progress reaches no boundary until it is done, so a command waits for it.
public sealed partial class TrainingCoordinator
{
    // `node down` and `fault kill-worker` waiting for the next step boundary: node address → incarnation (uid).
    private readonly Dictionary<string, long> _downAsked = new();
    private readonly Dictionary<string, long> _killAsked = new();
    // `node leave` sent to these nodes: their RequestLeave (the hand-over) is on its way.
    private readonly HashSet<string> _leaveOrdered = new();
    // Per node address, the process id it registered with (kill-worker refuses a node in the coordinator's process).
    private readonly Dictionary<string, int> _processOf = new();

    private void ShellControls()
    {
        Receive<ShellControlCommand>(m => Sender.Tell(OnShellControlCommand(m)));
    }

    /// <summary>Journals a control command the coordinator accepted (the reply says Ok), so the journal keeps every operator action.</summary>
    private ShellAck Journaled(string command, string[] args, ShellAck ack)
    {
        if (ack.Ok) Apply(new ShellCommandIssued(_state.NextStep, command, args));
        return ack;
    }

    private ShellAck OnShellControlCommand(ShellControlCommand m)
    {
        if (!ShellTokenAccepted(m.Token, out var refusal)) return new ShellAck(false, refusal);
        if (_finished) return new ShellAck(false, $"the run has ended (after step {_state.NextStep})");
        if (_state.Plan is null) return new ShellAck(false, "no plan is installed yet: wait for the run's first step");
        var args = m.Args ?? [];
        return m.Action switch
        {
            "relayout" => Relayout(args),
            "node-leave" or "node-down" or "fault-kill-worker" when args.Length != 1 && !(m.Action == "node-down" && args.Length > 1)
                => new ShellAck(false, $"{m.Action} takes one node address"),
            "node-down" when args.Length > 1 => NodeDownTogether(args),
            "node-leave" => NodeLeave(args[0]),
            "node-down" => NodeDown(args[0]),
            "fault-kill-worker" => KillWorker(args[0]),
            _ => new ShellAck(false, $"unknown control command '{m.Action}'"),
        };
    }

    private ShellAck Relayout(string[] args)
    {
        if (args.Length != 2 || !int.TryParse(args[0], out int workers) || !int.TryParse(args[1], out int pp))
            return new ShellAck(false, "relayout takes a layout WORKERSxPP");
        if (ElasticPlanner.LayoutRefusal(workers, pp, WorkersStaying, _config.Model) is { } why)
            return new ShellAck(false, $"cannot re-lay out to {workers}x{pp}: {why}");
        var plan = _state.Plan!;
        if (plan.WorldSize == workers && plan.Pp == pp && _requested is null)
            return new ShellAck(false, $"the run is already laid out as {workers}x{pp} (DP {plan.Dp} x PP {pp})");
        Journaled("relayout", [$"{workers}", $"{pp}"], new ShellAck(true, ""));
        _requested = new RequestRelayout(workers, pp);
        _report.Info($"re-layout to {workers} worker(s) x PP {pp} requested from the shell");
        if (AtBoundaryNow()) return new ShellAck(true, $"re-laying out to {workers} worker(s), DP {workers / pp} x PP {pp}, at this boundary (paused); `plan` shows it once installed");
        return new ShellAck(true, $"re-layout to {workers} worker(s), DP {workers / pp} x PP {pp}, at the next step boundary; `plan` shows it once installed");
    }

    private ShellAck NodeLeave(string given)
    {
        if (NodeRefusal(given, "leave", out var node, out var agent) is { } refusal) return new ShellAck(false, refusal);
        if (_leaving.ContainsKey(node) || !_leaveOrdered.Add(node)) return new ShellAck(false, $"node {node} is already leaving");
        if (WorkersOn(node) == WorkersStaying) return new ShellAck(false, $"node {node} runs every worker left in the run: it cannot hand its units over (train stop ends the run)");
        Journaled("node-leave", [node], new ShellAck(true, ""));
        _report.Info($"node {node} asked to leave from the shell");
        // What its SIGTERM does: the node asks for the hand-over (RequestLeave), which re-plans at a step boundary.
        agent.Tell(new NodeLeaveOrder("asked to leave from the shell (node leave)"));
        return new ShellAck(true, $"node {node} hands its units over at {(_holding ? "this step boundary (paused)" : "the next step boundary")}, then leaves the cluster");
    }

    private ShellAck NodeDown(string given)
    {
        if (LossRefusal(given, "down", out var node, out _) is { } refusal) return new ShellAck(false, refusal);
        if (_downAsked.ContainsKey(node)) return new ShellAck(false, $"node {node} is already to be downed at the next step boundary");
        long uid = _agents.First(a => a.Address == node).Uid;
        Journaled("node-down", [node], new ShellAck(true, ""));
        _report.Info($"node {node} to be downed from the shell");
        bool now = _holding;
        if (now) DownNode(node, uid);
        else _downAsked[node] = uid;
        return new ShellAck(true, $"node {node} {(now ? "downed at this step boundary (paused)" : "is downed at the next step boundary")}; the run recovers without it");
    }

    private ShellAck KillWorker(string given)
    {
        if (LossRefusal(given, "kill", out var node, out var agent) is { } refusal) return new ShellAck(false, refusal);
        if (_killAsked.ContainsKey(node)) return new ShellAck(false, $"node {node} is already to be killed at the next step boundary");
        var self = Akka.Cluster.Cluster.Get(Context.System).SelfAddress;
        if (_processOf.TryGetValue(node, out int pid) && pid == Environment.ProcessId && Address.Parse(node).Host == self.Host)
            return new ShellAck(false, $"node {node} runs in the coordinator's own process (an in-process cluster): killing it would kill the coordinator; kill-worker needs a node process (elasticmoe node)");
        long uid = _agents.First(a => a.Address == node).Uid;
        Journaled("fault-kill-worker", [node], new ShellAck(true, ""));
        _report.Info($"fault drill: node {node} to be killed from the shell");
        if (_holding) agent.Tell(new NodeKillOrder("fault kill-worker from the shell"));
        else _killAsked[node] = uid;
        return new ShellAck(true, $"node {node} is killed (SIGKILL) at {(_holding ? "this step boundary (paused)" : "the next step boundary")}; the run recovers without it");
    }

    /// <summary>
    /// Called by StartStepOrFinish at a step boundary (no step in flight, no recovery pending): downs and kills
    /// asked for since the last one. True when a recovery was started (the step starts once it is installed).
    /// </summary>
    private bool ShellControlsDue()
    {
        foreach (var (node, uid) in _killAsked.ToList())
        {
            _killAsked.Remove(node);
            // The step starts now: the node dies under it, and the run recovers as from any SIGKILL.
            _agents.FirstOrDefault(a => a.Address == node && a.Uid == uid).Agent?.Tell(new NodeKillOrder("fault kill-worker from the shell"));
        }
        if (_downAsked.Count == 0) return false;
        var downs = _downAsked.ToList();
        _downAsked.Clear();
        // A phase in which a loss re-plans at once (no attempt is in flight), as HoldAtBoundary's.
        Enter(Phase.WaitingForWorkers, Common);
        foreach (var (node, uid) in downs) DownNode(node, uid);
        // False only when every node to down had gone already, or held nothing: no recovery, the step starts.
        return _gone.Count > 0 || _phase != Phase.WaitingForWorkers;
    }

    // As a lost node: downed in the cluster (so this incarnation never comes back), its workers recovered from
    // copies and mirrors by the usual re-plan.
    private void DownNode(string node, long uid) => OnMemberLost(Address.Parse(node), uid, "was downed from the shell");

    // ---- checks shared by the node commands -------------------------------------------------------

    private int WorkersOn(string node) => StayingWorkers.Count(w => w.NodeAddress == node);

    /// <summary>Why <paramref name="given"/> cannot be made to <paramref name="verb"/>, or null with the node's address and agent.</summary>
    private string? NodeRefusal(string given, string verb, out string node, out IActorRef agent)
    {
        node = "";
        agent = ActorRefs.Nobody;
        var known = _agents.Select(a => a.Address).Distinct().OrderBy(a => a, StringComparer.Ordinal).ToList();
        var match = known.Where(a => SameNode(a, given)).ToList();
        if (match.Count != 1)
            return $"no node of the run has address '{given}' (nodes: {(known.Count == 0 ? "none" : string.Join(", ", known))})";
        node = match[0];
        var self = Akka.Cluster.Cluster.Get(Context.System).SelfAddress.ToString();
        if (node == self) return $"node {node} hosts the coordinator: it cannot {verb} (train stop ends the run)";
        var n = node;
        agent = _agents.Last(a => a.Address == n).Agent;
        return null;
    }

    /// <summary>As <see cref="NodeRefusal"/>, for a node whose state is to be lost (down, kill): the run must be able to recover without it.</summary>
    private string? LossRefusal(string given, string verb, out string node, out IActorRef agent)
    {
        if (NodeRefusal(given, verb, out node, out agent) is { } refusal) return refusal;
        if (_leaving.ContainsKey(node) || _leaveOrdered.Contains(node)) return $"node {node} is leaving already";
        if (WorkersOn(node) >= WorkersStaying) return $"node {node} runs every worker left in the run: nothing could recover its units";
        var n = node;
        if (_config.Cluster.Redundancy == 0 && _state.Plan!.Workers.Any(w => w.NodeAddress == n))
            return $"cluster.redundancy is 0: the units of node {node} have no mirror, so the run could not recover them (node leave hands them over instead)";
        return null;
    }

    /// <summary>"akka.tcp://elasticmoe@h:p" given as such, or as "h:p".</summary>
    private static bool SameNode(string address, string given)
    {
        given = given.Trim();
        if (string.Equals(address, given, StringComparison.Ordinal)) return true;
        var a = Address.Parse(address);
        return string.Equals($"{a.Host}:{a.Port}", given, StringComparison.OrdinalIgnoreCase);
    }

    /// <summary>Paused at a boundary: go through it again now, so what was just asked for is carried out (the run holds again after). False when not paused there.</summary>
    private bool AtBoundaryNow()
    {
        if (!_holding) return false;
        _holding = false;
        StartStepOrFinish();
        return true;
    }
}
