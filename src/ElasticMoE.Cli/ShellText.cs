using System.Globalization;
using ElasticMoE.Runtime.Protocol;

namespace ElasticMoE.Cli;

/// <summary>The shell's replies as text for people (<c>--json</c> prints the same records as JSON).</summary>
internal static class ShellText
{
    private static readonly CultureInfo Inv = CultureInfo.InvariantCulture;

    public static void Print(TextWriter o, IElasticMoEMessage reply)
    {
        switch (reply)
        {
            case ShellCluster c:
                o.WriteLine($"cluster seen from {c.Self} (up {c.UptimeSeconds.ToString("F0", Inv)} s), leader {c.Leader}");
                Table(o, ["address", "status", "roles", "reachable", "coordinator"],
                    c.Members.Select(m => new[] { m.Address, m.Status, string.Join(",", m.Roles), m.Reachable ? "yes" : "NO", m.Coordinator ? "yes" : "" }));
                break;
            case ShellWorkers w:
                Table(o, ["node", "device", "rank", "stage", "replica", "blocks", "experts", "units", "compute s", "memory MiB", "threads", ""],
                    w.Workers.Select(x => new[]
                    {
                        x.Node, Num(x.Device), x.Rank < 0 ? "-" : Num(x.Rank), x.Rank < 0 ? "-" : Num(x.Stage), x.Rank < 0 ? "-" : Num(x.Replica),
                        x.Blocks, Num(x.Experts), Num(x.Units), Opt(x.ComputeSeconds, "F3"),
                        x.StatsStep < 0 ? "-" : (x.WorkingSetBytes / (1024.0 * 1024)).ToString("F0", Inv), x.StatsStep < 0 ? "-" : Num(x.Threads),
                        x.Leaving ? "leaving" : "",
                    }));
                o.WriteLine($"last step took {w.LastStepSeconds.ToString("F3", Inv)} s");
                break;
            case ShellPlan { Epoch: 0 }:
                o.WriteLine("no plan installed yet");
                break;
            case ShellPlan p:
                o.WriteLine($"plan {p.Epoch} from step {p.AtStep}: {p.WorldSize} worker(s), DP {p.Dp} x PP {p.Pp}, redundancy {p.Redundancy}");
                foreach (var s in p.Stages) o.WriteLine($"  stage {s.Stage}: blocks [{s.First},{s.End}) on rank(s) {string.Join(",", s.Ranks)}");
                for (int r = 0; r < p.Ranks.Length; r++) o.WriteLine($"  rank {r}: {p.Ranks[r]}");
                foreach (var e in p.Experts)
                    o.WriteLine($"  layer {e.Layer} experts -> ranks {string.Join(" ", e.Owner)}" +
                                (e.Mirror.Any(m => m >= 0) ? $" (mirrors {string.Join(" ", e.Mirror)})" : ""));
                break;
            case ShellTrainStatus s:
                o.WriteLine($"step {s.Step}/{s.StepsTotal}  phase {s.Phase}  loss {Opt(s.Loss, "F4")}  val {Opt(s.ValLoss, "F4")}" +
                            (s.ValStep is { } vs ? $" (after step {vs})" : "") +
                            $"  tok/s {Opt(s.TokensPerSecond, "F0")}  ETA {Opt(s.EtaSeconds, "F0")} s  redone {s.RedoneAttempts}  plans {s.Plans}  workers {s.Workers}" +
                            (s.Stopping is { } why ? $"  stopping: {why}" : "") +
                            (s.BelowRedundancy is { } risk ? $"\n  {risk}" : ""));
                break;
            case ShellExpertLoads { Step: < 0 }:
                o.WriteLine("no step committed yet");
                break;
            case ShellExpertLoads l:
                o.WriteLine($"tokens per expert at step {l.Step + 1}");
                foreach (var layer in l.Layers)
                    o.WriteLine($"  layer {layer.Layer}: {string.Join(" ", layer.Tokens.Select(Num))}  (max/mean {layer.MaxOverMean.ToString("F2", Inv)})");
                break;
            case ShellCheckpoints { Checkpoints.Length: 0 } c:
                o.WriteLine(c.RunDirectory is null ? "no checkpoints: the run has no --run-dir" : $"no checkpoint committed yet in {c.RunDirectory}");
                break;
            case ShellCheckpoints c:
                Table(o, ["step", "files", "bytes", "manifest sha256"],
                    c.Checkpoints.Select(x => new[] { Num(x.Step), Num(x.Files), Num(x.Bytes), x.ManifestSha256 }));
                break;
            case ShellAck a:
                o.WriteLine(a.Message);
                break;
            case ShellRebalancePreview { Possible: false } r:
                o.WriteLine($"no rebalance possible: {r.Message}");
                break;
            case ShellRebalancePreview r:
                o.WriteLine(string.Create(Inv, $"dry run over the last {r.WindowSteps} step(s): worker max/mean load {r.MaxOverMeanBefore:F3} -> {r.MaxOverMeanAfter:F3}, {r.CopiesMoved} expert cop(ies) moved ({r.Message})"));
                break;
            case var r when ShellReadText.TryPrint(o, r):
                break;
            default:
                o.WriteLine(reply.ToString());
                break;
        }
    }

    private static string Num(long v) => v.ToString(Inv);

    private static string Opt(double? v, string format) => v is { } x ? x.ToString(format, Inv) : "-";

    internal static void Table(TextWriter o, string[] header, IEnumerable<string[]> rows)
    {
        var all = rows.Prepend(header).ToList();
        var widths = header.Select((_, i) => all.Max(r => r[i].Length)).ToArray();
        foreach (var r in all) o.WriteLine(string.Join("  ", r.Select((cell, i) => cell.PadRight(widths[i]))).TrimEnd());
    }
}

/// <summary>
/// The REPL's input: on a terminal, a line editor with history (up/down arrows) and tab completion of
/// command names and node addresses (<see cref="ShellCompleter"/>); otherwise (piped input) plain lines.
/// </summary>
internal sealed class LineEditor(Func<string, IReadOnlyList<string>> complete)
{
    private readonly List<string> _history = new();

    public string? ReadLine(string prompt)
    {
        if (Console.IsInputRedirected)
            return Console.In.ReadLine();
        Console.Write(prompt);
        var line = new System.Text.StringBuilder();
        int back = _history.Count;   // position in the history while browsing it
        while (true)
        {
            var key = Console.ReadKey(intercept: true);
            switch (key.Key)
            {
                case ConsoleKey.Enter:
                    Console.WriteLine();
                    var text = line.ToString();
                    if (text.Trim().Length > 0 && (_history.Count == 0 || _history[^1] != text)) _history.Add(text);
                    return text;
                case ConsoleKey.Backspace:
                    if (line.Length > 0)
                    {
                        line.Length--;
                        Console.Write("\b \b");
                    }
                    break;
                case ConsoleKey.UpArrow or ConsoleKey.DownArrow:
                    back = Math.Clamp(back + (key.Key == ConsoleKey.UpArrow ? -1 : 1), 0, _history.Count);
                    Replace(line, back < _history.Count ? _history[back] : "");
                    break;
                case ConsoleKey.Tab:
                    Complete(prompt, line);
                    break;
                case ConsoleKey.D when key.Modifiers.HasFlag(ConsoleModifiers.Control) && line.Length == 0:
                    Console.WriteLine();
                    return null;
                default:
                    if (!char.IsControl(key.KeyChar))
                    {
                        line.Append(key.KeyChar);
                        Console.Write(key.KeyChar);
                    }
                    break;
            }
        }
    }

    private static void Replace(System.Text.StringBuilder line, string text)
    {
        Console.Write(new string('\b', line.Length) + new string(' ', line.Length) + new string('\b', line.Length));
        line.Clear().Append(text);
        Console.Write(text);
    }

    // The longest common prefix of the lines that complete what was typed; all of them when that adds nothing.
    private void Complete(string prompt, System.Text.StringBuilder line)
    {
        var typed = line.ToString();
        var matches = complete(typed);
        if (matches.Count == 0) return;
        var prefix = matches.Aggregate((a, b) => a[..Enumerable.Range(0, Math.Min(a.Length, b.Length)).TakeWhile(i => a[i] == b[i]).Count()]);
        if (matches.Count == 1) prefix += " ";
        if (prefix.Length > typed.Length)
        {
            line.Append(prefix[typed.Length..]);
            Console.Write(prefix[typed.Length..]);
            return;
        }
        Console.WriteLine();
        // Only what differs: the last word of each (a node's address after --node, a command's name otherwise).
        int from = typed.LastIndexOf(' ') is var space and > 0 && matches.All(m => m.Length > space && m[..(space + 1)] == typed[..(space + 1)]) ? space + 1 : 0;
        Console.WriteLine(string.Join("  ", matches.Select(m => m[from..])));
        Console.Write(prompt + typed);
    }
}
