using ElasticMoE.Planning;
using ElasticMoE.Runtime.Protocol;

namespace ElasticMoE.Runtime.Actors;

// Redundancy as the coordinator sees it: the failure domain each node declared when it registered (what the
// pure MirrorPlanner spreads copies over) and how a plan's mirrors are reported. Who mirrors what is in the
// plan itself (TrainingPlan.Keepers); recovery finds a surviving copy among every unit's r mirrors through the
// planners (TransferPlanner's holdings, ElasticPlanner's carried experts), not here.
public sealed partial class TrainingCoordinator
{
    // Node address → its cluster.failure-domain; a node that declared none is absent (its own domain).
    private readonly Dictionary<string, string> _domainOf = new();

    private void NoteDomain(RegisterNode m)
    {
        if (!string.IsNullOrEmpty(m.FailureDomain)) _domainOf[m.NodeAddress] = m.FailureDomain;
        else _domainOf.Remove(m.NodeAddress);
    }

    // `node-down A B …`: several nodes lost at one step boundary with no plan between them, as when a rack, a
    // zone or a spot reclaim takes them together (what cluster.redundancy = r is for). All are checked first and
    // none is downed if one is refused; then each is downed at once (held at a boundary) or all at the next one.
    private ShellAck NodeDownTogether(string[] given)
    {
        var nodes = new List<(string Node, long Uid)>();
        foreach (var g in given)
        {
            if (LossRefusal(g, "down", out var node, out _) is { } refusal) return new ShellAck(false, refusal);
            if (_downAsked.ContainsKey(node) || nodes.Any(n => n.Node == node)) return new ShellAck(false, $"node {node} is already to be downed");
            nodes.Add((node, _agents.First(a => a.Address == node).Uid));
        }
        if (nodes.Sum(n => WorkersOn(n.Node)) >= WorkersStaying)
            return new ShellAck(false, "these nodes run every worker left in the run: nothing could recover their units");
        bool now = _holding;
        foreach (var (node, uid) in nodes)
        {
            Journaled("node-down", [node], new ShellAck(true, ""));
            _report.Info($"node {node} to be downed from the shell, with {nodes.Count - 1} other(s) at the same boundary");
            // Not through NodeDown: the first loss's re-plan ends the hold, and the others must not wait for the next boundary.
            if (now) DownNode(node, uid);
            else _downAsked[node] = uid;
        }
        return new ShellAck(true, $"{nodes.Count} nodes {(now ? "downed together at this step boundary (paused)" : "are downed together at the next step boundary")}; the run recovers without them");
    }

    // The end of a plan's log line: where its mirrors are, and a warning when it is below its redundancy.
    private static string MirrorSummary(TrainingPlan plan)
    {
        if (plan.Redundancy <= 0) return "";
        if (plan.NodeCount <= 1)
            // A run on one node (the default `train`) chose that; said plainly, not as an alarm.
            return "; not mirrored (one node: a node that joins gets the mirrors)";
        var text = plan.Redundancy == 1 && plan.Domains is null ? ", mirrored on buddies" : $", {plan.Redundancy} mirror(s) per unit";
        if (plan.Domains is not null) text += $" across {plan.DomainCount} failure domain(s)";
        if (plan.BelowRedundancy)
            text += $"; BELOW REDUNDANCY: {plan.Redundancy} mirror(s) asked, {plan.EffectiveRedundancy} possible on {plan.NodeCount} node(s) " +
                    $"(losing {plan.EffectiveRedundancy + 1} node(s) at once may lose state until nodes join)";
        else if (plan.Domains is not null && plan.DomainCount < plan.Redundancy + 1)
            text += $"; {plan.DomainCount} domain(s) for {plan.Redundancy + 1} copies: some copies share a domain";
        return text;
    }
}
