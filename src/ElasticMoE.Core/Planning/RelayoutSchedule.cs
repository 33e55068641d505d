using System.Globalization;

namespace ElasticMoE.Planning;

/// <summary>From step <paramref name="Step"/> on, train on <paramref name="Workers"/> workers with pipeline degree <paramref name="Pp"/>.</summary>
public sealed record RelayoutPoint(long Step, int Workers, int Pp)
{
    /// <summary>Data-parallel degree: what remains of the workers once the pipeline is formed.</summary>
    public int Dp => Workers / Pp;

    /// <summary>The point as it is written on the command line, <c>STEP=WORKERSxPP</c>.</summary>
    public override string ToString() => string.Create(CultureInfo.InvariantCulture, $"{Step}={Workers}x{Pp}");
}

/// <summary>
/// The <c>--relayout</c> option: scripted layout changes, so elasticity can be exercised (and benchmarked)
/// without killing processes. Written <c>STEP=WORKERSxPP</c>, comma separated, e.g.
/// <c>10=4x2,20=4x4,30=2x1,40=3x1</c>: at step 10 go to 4 workers as DP 2 × PP 2, and so on.
/// </summary>
public static class RelayoutSchedule
{
    private const string Syntax = "expected STEP=WORKERSxPP[,STEP=WORKERSxPP...], e.g. 10=4x2,20=2x1";

    /// <summary>
    /// Parses the option. Everything that could only fail later, mid-run, is refused here: bad numbers,
    /// steps out of order, a pipeline degree that does not divide the worker count, more workers than a plan
    /// may have. What depends on the model or the cluster (pp ≤ layers, enough workers) is checked by
    /// <see cref="ElasticPlanner.Next"/> when the point is reached.
    /// </summary>
    /// <exception cref="FormatException">The text is not a valid schedule; the message names the entry and why.</exception>
    public static IReadOnlyList<RelayoutPoint> Parse(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        if (string.IsNullOrWhiteSpace(text)) throw new FormatException($"--relayout: empty schedule; {Syntax}");
        var points = new List<RelayoutPoint>();
        foreach (var raw in text.Split(','))
        {
            var entry = raw.Trim();
            if (entry.Length == 0) throw new FormatException($"--relayout '{text}': empty entry; {Syntax}");
            var eq = entry.Split('=');
            if (eq.Length != 2) throw new FormatException($"--relayout entry '{entry}': {Syntax}");
            long step = Number(eq[0], entry, "step");
            var (workers, pp) = Layout(eq[1], $"--relayout entry '{entry}'", Syntax);
            if (step < 1) throw new FormatException($"--relayout entry '{entry}': step must be at least 1");
            if (points.Count > 0 && step <= points[^1].Step)
                throw new FormatException($"--relayout entry '{entry}': steps must be strictly increasing (previous entry is at step {points[^1].Step})");
            points.Add(new RelayoutPoint(step, workers, pp));
        }
        return points;
    }

    /// <summary>
    /// One layout, <c>WORKERSxPP</c> (the shell's <c>relayout 2x1</c>): the same checks as a schedule entry's layout.
    /// What depends on the model or the cluster is left to <see cref="ElasticPlanner.LayoutRefusal"/>.
    /// </summary>
    /// <exception cref="FormatException">The text is not a valid layout; the message says why.</exception>
    public static (int Workers, int Pp) ParseLayout(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        return Layout(text, $"layout '{text.Trim()}'", "expected WORKERSxPP, e.g. 2x1 or 4x2");
    }

    private static (int Workers, int Pp) Layout(string text, string what, string syntax)
    {
        var layout = text.Trim().Split('x', 'X');
        if (layout.Length != 2) throw new FormatException($"{what}: layout must be WORKERSxPP; {syntax}");
        long workers = Number(layout[0], what, "workers", syntax);
        long pp = Number(layout[1], what, "pp", syntax);
        if (workers < 1) throw new FormatException($"{what}: workers must be at least 1");
        if (workers > ElasticPlanner.MaxWorkers)
            throw new FormatException($"{what}: at most {ElasticPlanner.MaxWorkers} workers (data-plane tags carry a 12-bit rank)");
        if (pp < 1) throw new FormatException($"{what}: pp must be at least 1");
        if (workers % pp != 0) throw new FormatException($"{what}: pp {pp} must divide workers {workers}");
        return ((int)workers, (int)pp);
    }

    private static long Number(string s, string entry, string what) => Number(s, $"--relayout entry '{entry}'", what, Syntax);

    private static long Number(string s, string where, string what, string syntax)
    {
        var t = s.Trim();
        if (t.StartsWith('-') && long.TryParse(t, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out var negative))
            return negative;   // a well-formed negative number: let the range checks name the problem
        if (!long.TryParse(t, NumberStyles.None, CultureInfo.InvariantCulture, out var v))
            throw new FormatException($"{where}: {what} '{t}' is not a whole number; {syntax}");
        return v;   // workers and pp fit an int once the range checks pass (pp ≤ workers ≤ MaxWorkers)
    }
}
