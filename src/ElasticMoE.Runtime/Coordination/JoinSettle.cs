namespace ElasticMoE.Runtime.Coordination;

/// <summary>
/// When nodes that joined a running job are planned in (<c>cluster.join-settle</c>): once no further node has joined
/// for the settle window (a quiet window, so a burst of arrivals is planned with one re-plan, however long it lasts up
/// to the cap), and at the latest <see cref="CapFactor"/> windows after the first of them (so a steady trickle of
/// arrivals cannot postpone the re-plan forever). Pure: the caller passes the clock. The same rule gathers nodes that
/// ask to leave (<c>cluster.leave-settle</c>), with one more bound: a leaver's notice (<see cref="Joined"/>'s
/// <c>latest</c>), past which it must be planned out whatever else arrives.
/// </summary>
/// <remarks>
/// Why quiet rather than fixed: a fixed window from the first arrival (what it was, 2 s) either splits a burst that
/// outlasts it into two re-plans or makes a lone node wait the whole window; measured on test hosts, a join's
/// registration → next committed step was 1.6-1.8 s at a 0.3 s window, of which the window is the part this sets.
/// </remarks>
public sealed class JoinSettle(double windowSeconds)
{
    public const double CapFactor = 4;

    private double? _first, _last;
    private double _latest = double.PositiveInfinity;

    /// <summary>Whether nodes are waiting to be planned in.</summary>
    public bool Pending => _first is not null;

    /// <summary>A node joined (or asked to leave) at <paramref name="now"/> (seconds on any monotonic clock); it must be
    /// planned at a boundary reached by <paramref name="latest"/> at the latest.</summary>
    public void Joined(double now, double latest = double.PositiveInfinity)
    {
        _first ??= now;
        _last = now;
        _latest = Math.Min(_latest, latest);
    }

    /// <summary>Whether the waiting nodes are to be planned in at a step boundary reached at <paramref name="now"/>.</summary>
    public bool Due(double now) =>
        _first is { } first && _last is { } last && (now - last >= windowSeconds || now - first >= CapFactor * windowSeconds || now >= _latest);

    /// <summary>A plan was made: whoever was present is in it.</summary>
    public void Planned()
    {
        _first = _last = null;
        _latest = double.PositiveInfinity;
    }
}
