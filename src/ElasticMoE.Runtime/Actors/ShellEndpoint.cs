using Akka.Actor;
using Akka.Cluster;
using ElasticMoE.Runtime.Hosting;
using ElasticMoE.Runtime.Protocol;

namespace ElasticMoE.Runtime.Actors;

/// <summary>
/// What <c>elasticmoe shell</c> talks to: every coordinator-role node runs one at <see cref="Path"/>. It
/// answers cluster queries itself (Akka.Cluster's view from this node) and forwards run queries and control
/// commands to the coordinator singleton when it runs here, with a bounded wait, so the shell always gets
/// an answer: the coordinator's, or a <see cref="ShellError"/> saying why there is none.
/// </summary>
public sealed class ShellEndpoint : ReceiveActor
{
    public const string Name = "shell";
    public const string Path = "/user/" + Name;

    /// <summary>How long the coordinator may take to answer. It answers from memory, between two messages
    /// of the step protocol, so this is only reached while it is blocked (recovering its journal) or gone.</summary>
    public static readonly TimeSpan CoordinatorTimeout = TimeSpan.FromSeconds(5);

    private const string SingletonPath = "/user/coordinator/singleton";

    private readonly ActorSystem _system = Context.System;

    public ShellEndpoint()
    {
        var cluster = Cluster.Get(Context.System);
        Receive<ShellClusterQuery>(_ => Sender.Tell(ClusterState(cluster)));
        Receive<ShellActorTreeQuery>(m =>
        {
            var replyTo = Sender;
            ActorTrees(cluster, m).PipeTo(replyTo);
        });
        Receive<IShellRunRequest>(m =>
        {
            var replyTo = Sender;
            Ask(cluster, m).PipeTo(replyTo);
        });
    }

    public static Props Props() => Akka.Actor.Props.Create<ShellEndpoint>();

    private async Task<IElasticMoEMessage> Ask(Cluster cluster, IShellRunRequest request)
    {
        IActorRef coordinator;
        try
        {
            coordinator = await _system.ActorSelection(SingletonPath).ResolveOne(CoordinatorTimeout).ConfigureAwait(false);
        }
        catch (ActorNotFoundException)
        {
            var host = OldestCoordinatorNode(cluster);
            return new ShellError(host is not null && host != cluster.SelfAddress
                ? $"the coordinator does not run on this node ({cluster.SelfAddress}, a stand-by): connect to {host.Host}:{host.Port}"
                : $"the coordinator is not running on this node ({cluster.SelfAddress}): the run has not started or has ended");
        }
        try
        {
            var wait = request is IShellLongRequest ? IShellLongRequest.LongTimeout : CoordinatorTimeout;
            return await coordinator.Ask<IElasticMoEMessage>(request, wait).ConfigureAwait(false);
        }
        catch (Exception ex) when (ex is AskTimeoutException or TaskCanceledException or TimeoutException)
        {
            return new ShellError($"the coordinator did not answer within {CoordinatorTimeout.TotalSeconds:F0} s (busy recovering its journal, or the run is ending)");
        }
    }

    /// <summary>How long <c>actors tree</c> waits for each node's <see cref="ActorTreeProbe"/>.</summary>
    public static readonly TimeSpan ProbeTimeout = TimeSpan.FromSeconds(3);

    // `actors tree`: every member's (or the one named) probe, asked at once; a node that does not answer says so.
    private async Task<IElasticMoEMessage> ActorTrees(Cluster cluster, ShellActorTreeQuery query)
    {
        if (!query.Path.StartsWith('/')) return new ShellError($"an actor path starts with '/', got '{query.Path}'");
        var members = cluster.State.Members.Where(m => m.Status != MemberStatus.Removed).Select(m => m.Address).ToList();
        if (query.Node.Length > 0)
        {
            members = members.Where(a => a.ToString() == query.Node || a.ToString().EndsWith("@" + query.Node, StringComparison.Ordinal)).ToList();
            if (members.Count == 0) return new ShellError($"no cluster member {query.Node} (`cluster show` lists them)");
        }
        var trees = await Task.WhenAll(members.Select(async a =>
        {
            try
            {
                return await _system.ActorSelection(a + ActorTreeProbe.Path).Ask<ShellNodeTree>(new ActorTreeRequest(query.Path), ProbeTimeout).ConfigureAwait(false);
            }
            catch (Exception ex) when (ex is AskTimeoutException or TaskCanceledException or TimeoutException)
            {
                return new ShellNodeTree(a.ToString(), false, $"no answer within {ProbeTimeout.TotalSeconds:F0} s", []);
            }
        })).ConfigureAwait(false);
        return new ShellActorTrees(trees.OrderBy(t => t.Node, StringComparer.Ordinal).ToArray());
    }

    private static Address? OldestCoordinatorNode(Cluster cluster)
        => cluster.State.Members.Where(m => m.HasRole(ClusterNode.CoordinatorRole) && m.Status == MemberStatus.Up)
            .OrderBy(m => m, Member.AgeOrdering).FirstOrDefault()?.Address;

    private static ShellCluster ClusterState(Cluster cluster)
    {
        var state = cluster.State;
        var unreachable = state.Unreachable.Select(m => m.UniqueAddress).ToHashSet();
        var oldest = OldestCoordinatorNode(cluster);
        var members = state.Members.Select(m => new ShellMember(m.Address.ToString(), m.Status.ToString(), m.Roles.OrderBy(r => r, StringComparer.Ordinal).ToArray(),
            !unreachable.Contains(m.UniqueAddress), m.Address == oldest)).ToArray();
        return new ShellCluster(cluster.SelfAddress.ToString(), state.Leader?.ToString() ?? "", cluster.System.Uptime.TotalSeconds, members);
    }
}
