using Akka.Actor;
using Akka.Event;

namespace ElasticMoE.Runtime.Hosting;

/// <summary>
/// On a stand-by coordinator's node: downs any member whose process is gone (its remoting connection closed
/// and a reconnect is refused, <see cref="ConnectionProbe"/>): the dead coordinator, and the node
/// incarnations that ended when they lost it (they come back as new ones). The singleton moves here only
/// once no member is unreachable; without this it waits for the failure detector (~4.5 s on loopback) and
/// the split-brain resolver's stable-after (5 s). Measured (2 node processes, 2-core box), SIGKILL of the
/// coordinator to the next committed step: 12.7 s with only the coordinator downed here, 7.6–8.7 s with
/// this watch, the nodes downing themselves and a 500 ms removal margin; what is left is mostly the old
/// node incarnations' coordinated shutdown and the failure detector seeing them go.
/// </summary>
internal sealed class StandbyWatch : ReceiveActor, IWithTimers
{
    public ITimerScheduler Timers { get; set; } = null!;

    private sealed record Probed(Address Address, bool Dead, int Try);
    private sealed record ProbeAgain(Address Address, int Try);

    // A connection closes as a process begins to shut down, while its port may still accept for a moment:
    // a probe that connects is repeated a few times before the failure detector is left to decide.
    private const int Tries = 4;
    private static readonly TimeSpan Retry = TimeSpan.FromMilliseconds(500);

    public StandbyWatch()
    {
        var cluster = Akka.Cluster.Cluster.Get(Context.System);
        var log = Context.GetLogger();
        Receive<Akka.Remote.DisassociatedEvent>(m => Probe(cluster, m.RemoteAddress, 1));
        Receive<Akka.Cluster.ClusterEvent.UnreachableMember>(m => Probe(cluster, m.Member.Address, 1));
        Receive<ProbeAgain>(m => Probe(cluster, m.Address, m.Try));
        Receive<Probed>(m =>
        {
            if (!m.Dead)
            {
                if (m.Try < Tries) Timers.StartSingleTimer(m.Address, new ProbeAgain(m.Address, m.Try + 1), Retry);
                return;
            }
            log.Warning("node {0} is gone (its connection closed and a reconnect was refused): downing it", m.Address);
            cluster.Down(m.Address);
        });
    }

    private void Probe(Akka.Cluster.Cluster cluster, Address address, int attempt)
    {
        if (address == cluster.SelfAddress || !cluster.State.Members.Any(x => x.Address == address && x.Status != Akka.Cluster.MemberStatus.Down)) return;
        ConnectionProbe.RefusedAsync(address, TimeSpan.FromSeconds(1))
            .ContinueWith(t => new Probed(address, t.Result, attempt), TaskContinuationOptions.ExecuteSynchronously).PipeTo(Self);
    }

    protected override void PreStart()
    {
        Context.System.EventStream.Subscribe(Self, typeof(Akka.Remote.DisassociatedEvent));
        Akka.Cluster.Cluster.Get(Context.System).Subscribe(Self, Akka.Cluster.ClusterEvent.SubscriptionInitialStateMode.InitialStateAsEvents,
            typeof(Akka.Cluster.ClusterEvent.UnreachableMember));
    }

    protected override void PostStop()
    {
        Context.System.EventStream.Unsubscribe(Self);
        Akka.Cluster.Cluster.Get(Context.System).Unsubscribe(Self);
    }
}
