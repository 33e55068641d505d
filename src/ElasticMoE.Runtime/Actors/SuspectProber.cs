using System.Diagnostics;
using System.Globalization;
using Akka.Actor;
using Akka.Event;
using ElasticMoE.Runtime.Hosting;

namespace ElasticMoE.Runtime.Actors;

/// <summary>
/// Confirms what Akka's failure detector suspects. A member the heartbeats call unreachable is probed
/// (<see cref="ConnectionProbe.ProbeAsync"/>): no answer within the probe timeout, or a refused connect, and the
/// parent is told <see cref="SuspectProber.Confirmed"/>; an answer means a busy member, not a lost one, and it is
/// probed again every probe interval for as long as it stays unreachable. A child of the coordinator (for its nodes)
/// and of each node agent (for its coordinator).
/// </summary>
/// <remarks>
/// Why: with the detector at LAN settings (a 1 s pause) a silent host is suspected in ~1.3 s instead of 4.1–5.7 s,
/// but a node whose cores are saturated can miss its heartbeats that long too; its kernel still answers a connect,
/// so the probe keeps a slow node from being downed while a host that is really gone is confirmed in one timeout.
/// </remarks>
public sealed class SuspectProber : ReceiveActor, IWithTimers
{
    /// <summary>The failure detector suspects <paramref name="Address"/> (incarnation <paramref name="Uid"/>).</summary>
    public sealed record Suspect(Address Address, long Uid);

    /// <summary>The member is reachable again, or gone by other means: stop probing it.</summary>
    public sealed record Cleared(Address Address);

    /// <summary>To the parent: the suspect is lost. <paramref name="What"/> says how, for the logs.</summary>
    public sealed record Confirmed(Address Address, long Uid, string What);

    private sealed record Probed(Address Address, long Uid, ConnectionProbe.Answer Answer);
    private sealed record Again(Address Address, long Uid);

    private sealed class Case(long uid)
    {
        public long Uid { get; } = uid;
        public Stopwatch Since { get; } = Stopwatch.StartNew();
        public int Answers { get; set; }
    }

    private readonly TimeSpan _timeout, _interval;
    private readonly Dictionary<Address, Case> _suspects = [];
    private readonly ILoggingAdapter _log = Context.GetLogger();

    public ITimerScheduler Timers { get; set; } = null!;

    public SuspectProber(TimeSpan timeout, TimeSpan interval)
    {
        _timeout = timeout;
        _interval = interval;
        Receive<Suspect>(m =>
        {
            if (_suspects.TryGetValue(m.Address, out var c) && c.Uid == m.Uid) return;
            _suspects[m.Address] = new Case(m.Uid);
            Probe(m.Address, m.Uid);
        });
        Receive<Cleared>(m =>
        {
            if (_suspects.Remove(m.Address, out var c) && c.Answers > 0)
                _log.Info("{0} is reachable again after {1:F1} s (it answered {2} probe(s) meanwhile: busy, not lost)", m.Address, c.Since.Elapsed.TotalSeconds, c.Answers);
            Timers.Cancel(m.Address.ToString());
        });
        Receive<Again>(m =>
        {
            if (_suspects.TryGetValue(m.Address, out var c) && c.Uid == m.Uid) Probe(m.Address, m.Uid);
        });
        Receive<Probed>(m =>
        {
            if (!_suspects.TryGetValue(m.Address, out var c) || c.Uid != m.Uid) return;
            switch (m.Answer)
            {
                case ConnectionProbe.Answer.Accepted:
                    if (c.Answers++ == 0)
                        _log.Warning("{0} is unreachable to the failure detector but its host answers: busy, not lost; probing every {1:F1} s", m.Address, _interval.TotalSeconds);
                    Timers.StartSingleTimer(m.Address.ToString(), new Again(m.Address, m.Uid), _interval);
                    break;
                default:
                    _suspects.Remove(m.Address);
                    var what = m.Answer == ConnectionProbe.Answer.Refused
                        ? "became unreachable and refused a reconnect (its process is gone)"
                        : string.Create(CultureInfo.InvariantCulture, $"went silent (unreachable, and no answer to a probe within {_timeout.TotalSeconds:0.###} s)");
                    Context.Parent.Tell(new Confirmed(m.Address, m.Uid, what));
                    break;
            }
        });
    }

    private void Probe(Address address, long uid)
    {
        ConnectionProbe.ProbeAsync(address, _timeout)
            .ContinueWith(t => new Probed(address, uid, t.IsCompletedSuccessfully ? t.Result : ConnectionProbe.Answer.Silent),
                TaskContinuationOptions.ExecuteSynchronously)
            .PipeTo(Self);
    }

    public static Props Props(Configuration.ElasticMoEConfig config) =>
        Akka.Actor.Props.Create(() => new SuspectProber(TimeSpan.FromSeconds(config.FailureDetection.ProbeTimeout), TimeSpan.FromSeconds(config.FailureDetection.ProbeInterval)));
}
