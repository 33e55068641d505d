using System.Globalization;

namespace ElasticMoE.Benchmarks;

/// <summary>One line of an availability trace: at <c>Milliseconds</c> node <c>Node</c> became available (add) or was reclaimed (remove).</summary>
public sealed record TraceEvent(long Milliseconds, bool Add, string Node);

/// <summary>
/// A machine-availability trace in the Bamboo / Oobleck CSV format — <c>milliseconds,add|remove,nodeNAME</c>, one event a
/// line, in time order — as replayed by <c>bench --suite trace</c>. Events at the same millisecond happen together (a spot
/// market reclaiming several instances at once is the case that matters). Blank lines and <c>#</c> comments are skipped,
/// and a header line (<c>time,...</c>) is allowed. Pure: parsing and scaling only.
/// </summary>
public sealed class AvailabilityTrace
{
    public IReadOnlyList<TraceEvent> Events { get; }

    /// <summary>The most nodes available at once.</summary>
    public int MaxNodes { get; }

    private AvailabilityTrace(IReadOnlyList<TraceEvent> events, int maxNodes)
    {
        Events = events;
        MaxNodes = maxNodes;
    }

    /// <exception cref="FormatException">A line that is not an event, events out of time order, a node added twice or
    /// removed while not there, or no event at all: the message names the source and the line.</exception>
    public static AvailabilityTrace Parse(string text, string source)
    {
        var events = new List<TraceEvent>();
        var present = new HashSet<string>(StringComparer.Ordinal);
        int max = 0;
        var lines = text.Split('\n');
        for (int i = 0; i < lines.Length; i++)
        {
            var line = lines[i].Trim();
            if (line.Length == 0 || line.StartsWith('#')) continue;
            string Where() => $"{source}:{i + 1}";
            var parts = line.Split(',').Select(p => p.Trim()).ToArray();
            if (events.Count == 0 && present.Count == 0 && parts.Length == 3 && !long.TryParse(parts[0], out _) && parts[0].Length > 0 && char.IsLetter(parts[0][0]))
                continue;   // a header
            if (parts.Length != 3)
                throw new FormatException($"{Where()}: expected 'milliseconds,add|remove,nodeNAME', got '{line}'");
            if (!long.TryParse(parts[0], NumberStyles.None, CultureInfo.InvariantCulture, out long ms))
                throw new FormatException($"{Where()}: '{parts[0]}' is not a time in milliseconds (a non-negative integer)");
            bool add = parts[1] switch
            {
                "add" => true,
                "remove" => false,
                _ => throw new FormatException($"{Where()}: '{parts[1]}' is neither add nor remove"),
            };
            var node = parts[2];
            if (node.Length == 0) throw new FormatException($"{Where()}: no node name");
            if (events.Count > 0 && ms < events[^1].Milliseconds)
                throw new FormatException($"{Where()}: time {ms} ms comes before the previous event's {events[^1].Milliseconds} ms (events must be in time order)");
            if (add && !present.Add(node)) throw new FormatException($"{Where()}: {node} is added while it is already available");
            if (!add && !present.Remove(node)) throw new FormatException($"{Where()}: {node} is removed while it is not available");
            events.Add(new TraceEvent(ms, add, node));
            max = Math.Max(max, present.Count);
        }
        if (events.Count == 0) throw new FormatException($"{source}: no events");
        return new AvailabilityTrace(events, max);
    }

    /// <summary>
    /// The node count after each instant of the trace (events at one millisecond taken together), in seconds divided by
    /// <paramref name="speed"/>, scaled so that the trace's <see cref="MaxNodes"/> becomes <paramref name="maxNodes"/>
    /// (rounded, and never below <paramref name="minNodes"/>: a run cannot go on with none). Instants that leave the
    /// scaled count unchanged are dropped; the first instant is always kept.
    /// </summary>
    public IReadOnlyList<(double Seconds, int Nodes, int Removed)> Scaled(double speed, int maxNodes, int minNodes = 1)
    {
        if (!(speed > 0)) throw new ArgumentOutOfRangeException(nameof(speed), "must be positive");
        if (maxNodes < minNodes) throw new ArgumentOutOfRangeException(nameof(maxNodes), $"must be at least {minNodes}");
        var result = new List<(double, int, int)>();
        int count = 0;
        foreach (var instant in Events.GroupBy(e => e.Milliseconds))
        {
            count += instant.Count(e => e.Add) - instant.Count(e => !e.Add);
            int scaled = Math.Max(minNodes, (int)Math.Round((double)count * maxNodes / MaxNodes, MidpointRounding.AwayFromZero));
            int before = result.Count > 0 ? result[^1].Item2 : 0;
            if (result.Count > 0 && scaled == before) continue;
            result.Add((instant.Key / 1000.0 / speed, scaled, Math.Max(0, before - scaled)));
        }
        return result;
    }
}
