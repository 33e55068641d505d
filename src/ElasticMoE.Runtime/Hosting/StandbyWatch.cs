using Akka.Actor;
using Akka.Event;

namespace ElasticMoE.Runtime.Hosting;

/// <summary>
/// On a stand-by coordinator's node: downs a coordinator-role member whose process is gone (its remoting
/// connection closed and a reconnect is refused, <see cref="ConnectionProbe"/>), so the coordinator
/// singleton moves here at once. Without it the move waits for the failure detector (~4.5 s on loopback)
/// and the split-brain resolver's stable-after (5 s).
/// </summary>
internal sealed class StandbyWatch : ReceiveActor
{
    private sealed record Probed(Address Address, bool Dead);

    public StandbyWatch()
    {
        var cluster = Akka.Cluster.Cluster.Get(Context.System);
        var log = Context.GetLogger();
        Receive<Akka.Remote.DisassociatedEvent>(m =>
        {
            var address = m.RemoteAddress;
            if (address == cluster.SelfAddress || !cluster.State.Members.Any(x => x.Address == address && x.HasRole(ClusterNode.CoordinatorRole))) return;
            ConnectionProbe.RefusedAsync(address, TimeSpan.FromSeconds(1))
                .ContinueWith(t => new Probed(address, t.Result), TaskContinuationOptions.ExecuteSynchronously).PipeTo(Self);
        });
        Receive<Probed>(m =>
        {
            if (!m.Dead) return;
            log.Warning("coordinator node {0} is gone (its connection closed and a reconnect was refused): downing it so this stand-by takes the run over", m.Address);
            cluster.Down(m.Address);
        });
    }

    protected override void PreStart() => Context.System.EventStream.Subscribe(Self, typeof(Akka.Remote.DisassociatedEvent));

    protected override void PostStop() => Context.System.EventStream.Unsubscribe(Self);
}
