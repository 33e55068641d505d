using Akka.Actor;
using Akka.Actor.Internal;
using ElasticMoE.Runtime.Protocol;

namespace ElasticMoE.Runtime.Actors;

/// <summary>
/// Every node runs one at <see cref="Path"/>: it answers <see cref="ActorTreeRequest"/> (the shell's
/// <c>actors tree</c>, through a <see cref="ShellEndpoint"/>) with this node's actors under a path, read from the
/// local actor cells (exact, no Identify round trips to wait out), depth first, at most <see cref="MaxDepth"/>
/// levels and <see cref="MaxActors"/> actors.
/// </summary>
public sealed class ActorTreeProbe : ReceiveActor
{
    public const string Name = "actor-tree";
    public const string Path = "/user/" + Name;
    public const int MaxDepth = 8;
    public const int MaxActors = 2000;

    public ActorTreeProbe()
    {
        Receive<ActorTreeRequest>(m => Sender.Tell(Walk(Context.System, m.Path)));
    }

    public static Props Props() => Akka.Actor.Props.Create<ActorTreeProbe>();

    /// <summary>The local actors of <paramref name="system"/> under <paramref name="path"/> ("/user", "/system", "/"...).</summary>
    public static ShellNodeTree Walk(ActorSystem system, string path)
    {
        var self = ((ExtendedActorSystem)system).Provider.DefaultAddress.ToString();
        var names = path.Split('/', StringSplitOptions.RemoveEmptyEntries);
        var root = ((ExtendedActorSystem)system).Provider.RootGuardian.GetChild(names);
        if (root is not ActorRefWithCell)
            return new ShellNodeTree(self, true, $"no actor at {path} on this node", []);
        var actors = new List<ShellActor>();
        Visit(root, 0, actors);
        return new ShellNodeTree(self, true, actors.Count >= MaxActors ? $"only the first {MaxActors} actors" : "", actors.ToArray());
    }

    private static void Visit(IActorRef actor, int depth, List<ShellActor> into)
    {
        if (into.Count >= MaxActors) return;
        var cell = actor as ActorRefWithCell;
        into.Add(new ShellActor(actor.Path.ToStringWithoutAddress(), depth, cell?.Underlying.Props.Type?.Name ?? ""));
        if (cell is null || depth >= MaxDepth) return;
        foreach (var child in cell.Children.OrderBy(c => c.Path.Name, StringComparer.Ordinal))
            Visit(child, depth + 1, into);
    }
}
