using System.Text.Json;

namespace ElasticMoE.Training;

/// <summary>One step line of a metrics file (<see cref="TrainingReport"/>): the 1-based step and what plots need of it.</summary>
/// <param name="Loss">NaN where the file has <c>null</c> (a non-finite loss).</param>
/// <param name="ExpertCounts">Tokens routed per [MoE layer ordinal][expert] in this step; empty for a dense model.</param>
public sealed record MetricsStep(long Step, double Loss, double? ValLoss, long[][] ExpertCounts);

/// <summary>One event line: a membership change (<c>node-lost</c>, <c>node-joined</c>, ...) or any later kind with a step.</summary>
public sealed record MetricsEvent(string Kind, long Step, string? Node);

/// <summary>
/// A metrics file read back: the step and event lines it has, and how many lines could not be read.
/// </summary>
/// <remarks>
/// Tolerant on purpose: a metrics file is read after the run, maybe while a killed process left it, maybe
/// after someone appended to it, so one unreadable line should cost that line and be counted, not the
/// whole file. Blank lines are not counted: a file ending in a newline has one.
/// </remarks>
public sealed record MetricsFile(IReadOnlyList<MetricsStep> Steps, IReadOnlyList<MetricsEvent> Events, int SkippedLines, int FirstSkippedLine)
{
    /// <exception cref="FileNotFoundException">The file does not exist.</exception>
    public static MetricsFile Read(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"metrics file not found: {path}", path);
        var steps = new List<MetricsStep>();
        var events = new List<MetricsEvent>();
        int skipped = 0, firstSkipped = 0, number = 0;
        foreach (var line in File.ReadLines(path))
        {
            number++;
            if (string.IsNullOrWhiteSpace(line)) continue;
            if (TryParse(line, out var step, out var ev))
            {
                if (step is not null) steps.Add(step);
                if (ev is not null) events.Add(ev);
            }
            else if (skipped++ == 0) firstSkipped = number;
        }
        return new MetricsFile(steps, events, skipped, firstSkipped);
    }

    private static bool TryParse(string line, out MetricsStep? step, out MetricsEvent? ev)
    {
        step = null;
        ev = null;
        try
        {
            using var doc = JsonDocument.Parse(line);
            var root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object || !root.TryGetProperty("step", out var s) || !s.TryGetInt64(out var n) || n < 0) return false;
            if (root.TryGetProperty("event", out var kind))
            {
                if (kind.ValueKind != JsonValueKind.String || string.IsNullOrEmpty(kind.GetString())) return false;
                ev = new MetricsEvent(kind.GetString()!, n, root.TryGetProperty("node", out var node) && node.ValueKind == JsonValueKind.String ? node.GetString() : null);
                return true;
            }
            if (!root.TryGetProperty("loss", out var loss) || !TryNumber(loss, out var l)) return false;
            double? val = null;
            if (root.TryGetProperty("val_loss", out var v))
            {
                if (!TryNumber(v, out var vl)) return false;
                val = vl;
            }
            var counts = Array.Empty<long[]>();
            if (root.TryGetProperty("expert_counts", out var c))
            {
                if (c.ValueKind != JsonValueKind.Array) return false;
                counts = c.EnumerateArray().Select(layer => layer.EnumerateArray().Select(x => x.GetInt64()).ToArray()).ToArray();
            }
            step = new MetricsStep(n, l, val, counts);
            return true;
        }
        // Not JSON, or an expert count that is not an array of integers.
        catch (Exception ex) when (ex is JsonException or InvalidOperationException or FormatException)
        {
            return false;
        }
    }

    // TrainingReport writes a non-finite value as null; read it back as NaN so the line still counts.
    private static bool TryNumber(JsonElement e, out double value)
    {
        value = double.NaN;
        return e.ValueKind == JsonValueKind.Null || (e.ValueKind == JsonValueKind.Number && e.TryGetDouble(out value));
    }
}
