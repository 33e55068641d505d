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
/// <para>The coordinator also suspects by step timing (<see cref="StepStarted"/>): a step that has taken more than
/// <c>step-overdue</c> times the median of the recent steps gets every node of the plan probed, and again every probe
/// interval until the step ends. A node whose host went silent mid-step is then found in about two step times plus
/// one probe timeout, without waiting for the heartbeats; an answer costs nothing (the step just is slow).</para>
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

    /// <summary>A step attempt began on these nodes (the coordinator): probe them all if it runs overdue.</summary>
    public sealed record StepStarted(IReadOnlyList<(Address Address, long Uid)> Nodes);

    /// <summary>The step attempt ended: committed after <paramref name="Seconds"/> (NaN: abandoned, redone or re-planned).</summary>
    public sealed record StepEnded(double Seconds);

    private sealed record Probed(Address Address, long Uid, ConnectionProbe.Answer Answer, long Watch = -1);
    private sealed record Again(Address Address, long Uid);
    private sealed record Overdue(long Watch);

    private sealed class Case(long uid)
    {
        public long Uid { get; } = uid;
        public Stopwatch Since { get; } = Stopwatch.StartNew();
        public int Answers { get; set; }
    }

    private readonly TimeSpan _timeout, _interval;
    private readonly double _overdueFactor;
    private readonly Dictionary<Address, Case> _suspects = [];
    // Step timing: the recent committed steps' durations, and the attempt being watched (its nodes; -1 = none).
    private readonly Queue<double> _recent = new();
    private long _watch = -1, _watches;
    private IReadOnlyList<(Address Address, long Uid)> _watched = [];
    private readonly ILoggingAdapter _log = Context.GetLogger();

    public ITimerScheduler Timers { get; set; } = null!;

    public SuspectProber(TimeSpan timeout, TimeSpan interval, double overdueFactor = 0)
    {
        _timeout = timeout;
        _interval = interval;
        _overdueFactor = overdueFactor;
        Receive<StepStarted>(m =>
        {
            Timers.Cancel("overdue");
            _watch = ++_watches;
            _watched = m.Nodes;
            // Until a few steps are known (start-up: first steps compile, warm caches) only the heartbeats suspect.
            if (_overdueFactor <= 0 || _recent.Count < 3) return;
            var median = _recent.Order().ElementAt(_recent.Count / 2);
            Timers.StartSingleTimer("overdue", new Overdue(_watch), TimeSpan.FromSeconds(Math.Max(MinOverdueSeconds, _overdueFactor * median)));
        });
        Receive<StepEnded>(m =>
        {
            Timers.Cancel("overdue");
            _watch = -1;
            if (!double.IsFinite(m.Seconds)) return;
            _recent.Enqueue(m.Seconds);
            while (_recent.Count > 15) _recent.Dequeue();
        });
        Receive<Overdue>(m =>
        {
            if (m.Watch != _watch) return;
            foreach (var (address, uid) in _watched)
                ConnectionProbe.ProbeAsync(address, _timeout)
                    .ContinueWith(t => new Probed(address, uid, t.IsCompletedSuccessfully ? t.Result : ConnectionProbe.Answer.Silent, m.Watch),
                        TaskContinuationOptions.ExecuteSynchronously)
                    .PipeTo(Self);
            Timers.StartSingleTimer("overdue", new Overdue(m.Watch), _timeout + _interval);
        });
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
        Receive<Probed>(m => m.Watch >= 0, m =>
        {
            // A step-timing probe: only silence or a refusal is news (an answer = a slow step, nothing to do).
            if (m.Watch != _watch || m.Answer == ConnectionProbe.Answer.Accepted) return;
            _watched = _watched.Where(n => n.Address != m.Address).ToList();
            _suspects.Remove(m.Address);
            var what = m.Answer == ConnectionProbe.Answer.Refused
                ? "refused a connect during an overdue step (its process is gone)"
                : string.Create(CultureInfo.InvariantCulture, $"went silent during a step (overdue, and no answer to a probe within {_timeout.TotalSeconds:0.###} s)");
            Context.Parent.Tell(new Confirmed(m.Address, m.Uid, what));
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

    // A step is never overdue sooner than this: below it, scheduling noise on a loaded box is most of a step's time.
    private const double MinOverdueSeconds = 0.25;

    /// <param name="stepTiming">Also suspect by step timing (the coordinator's prober).</param>
    public static Props Props(Configuration.ElasticMoEConfig config, bool stepTiming = false)
    {
        var fd = config.FailureDetection;
        return Akka.Actor.Props.Create(() => new SuspectProber(TimeSpan.FromSeconds(fd.ProbeTimeout), TimeSpan.FromSeconds(fd.ProbeInterval), stepTiming ? fd.StepOverdue : 0));
    }
}
