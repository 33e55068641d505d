using ElasticMoE.Configuration;

namespace ElasticMoE.Planning;

/// <summary>
/// The loads a rebalance plans for (<c>rebalance.window</c>): tokens routed to each expert over the last N steps
/// added, summed.
/// </summary>
/// <remarks>
/// A sliding sum rather than an EMA because the coordinator journals every step's expert counts: a coordinator that
/// restarts rebuilds exactly this window from the last N step records and so takes the same decisions, which an EMA
/// over the whole run could only do by replaying it all. Keyed by step, so a step that is redone after an abort
/// replaces its counts instead of counting twice.
/// </remarks>
public sealed class ExpertLoadWindow
{
    private readonly int steps;
    private readonly SortedDictionary<long, long[][]> byStep = new();

    public ExpertLoadWindow(int steps)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(steps, 1);
        this.steps = steps;
    }

    /// <summary>Steps in the window now (at most the window's length).</summary>
    public int Count => byStep.Count;

    /// <summary>Adds (or replaces) <paramref name="step"/>'s counts, [MoE layer][expert]; the oldest step beyond the window drops out.</summary>
    /// <exception cref="ArgumentException">Counts of another shape than the steps already in the window.</exception>
    public void Add(long step, IReadOnlyList<IReadOnlyList<long>> counts)
    {
        if (byStep.Count > 0 && byStep.Values.First() is var shape
            && (shape.Length != counts.Count || shape.Zip(counts).Any(t => t.First.Length != t.Second.Count)))
            throw new ArgumentException("expert counts of another shape (layers or experts) than the window's", nameof(counts));
        byStep[step] = counts.Select(layer => layer.ToArray()).ToArray();
        while (byStep.Count > steps) byStep.Remove(byStep.Keys.First());
    }

    /// <summary>[MoE layer][expert] tokens summed over the window, for <see cref="RebalancePlanner.Plan"/>; null while empty.</summary>
    public double[][]? Loads()
    {
        if (byStep.Count == 0) return null;
        var first = byStep.Values.First();
        var sum = first.Select(layer => new double[layer.Length]).ToArray();
        foreach (var counts in byStep.Values)
            for (int l = 0; l < counts.Length; l++)
                for (int e = 0; e < counts[l].Length; e++) sum[l][e] += counts[l][e];
        return sum;
    }
}

/// <summary>
/// When an automatic rebalance runs (<c>rebalance.every</c>, <c>threshold</c>, <c>hysteresis</c>): at a step that is a
/// multiple of <c>every</c> (never when it is 0), if the window's max/mean is above the threshold and, when the last
/// rebalance could not get below the threshold, above what it left plus the hysteresis. That second bar keeps a layout
/// that cannot be balanced below the threshold (too few slots, one expert hotter than a worker) from re-planning at every
/// check, while one that drifts worse is still rebalanced; it is lifted once max/mean is seen at or below threshold −
/// hysteresis. A requested rebalance does not ask this.
/// </summary>
public sealed class RebalanceTrigger(RebalanceOptions options)
{
    private double bar = options.Threshold;

    /// <summary>Called with every committed step's window max/mean; true when a rebalance is due at <paramref name="step"/>.</summary>
    public bool Check(long step, double maxOverMean)
    {
        if (maxOverMean <= options.Threshold - options.Hysteresis) bar = options.Threshold;
        return options.Every > 0 && step % options.Every == 0 && maxOverMean > bar;
    }

    /// <summary>Records what a rebalance (automatic or requested) left: <see cref="RebalanceResult.MaxOverMeanAfter"/>.</summary>
    public void Rebalanced(double maxOverMeanAfter) => bar = Math.Max(options.Threshold, maxOverMeanAfter + options.Hysteresis);
}
