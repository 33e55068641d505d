using System.Globalization;
using ElasticMoE.Runtime.Protocol;
using ScottPlot;
using Spectre.Console;
using Spectre.Console.Rendering;

namespace ElasticMoE.Cli;

/// <summary>The replies of the shell's further read commands as text (heatmap, verify, events, actors tree, diagnose), and the heatmap's PNG.</summary>
internal static class ShellReadText
{
    private static readonly CultureInfo Inv = CultureInfo.InvariantCulture;

    /// <summary>Prints <paramref name="reply"/> if it is one of these commands' replies; false otherwise.</summary>
    public static bool TryPrint(TextWriter o, IElasticMoEMessage reply)
    {
        switch (reply)
        {
            case ShellExpertHeatmap { Step: < 0 }:
                o.WriteLine("no step committed yet");
                return true;
            case ShellExpertHeatmap h:
                Heatmap(o, h);
                return true;
            case ShellCheckpointsVerified { Checkpoints.Length: 0 } v:
                o.WriteLine($"no checkpoint committed yet in {v.RunDirectory}");
                return true;
            case ShellCheckpointsVerified v:
                foreach (var c in v.Checkpoints)
                {
                    if (c.Ok) o.WriteLine($"ok   step {c.Step} ({c.Directory})");
                    foreach (var p in c.Problems) o.WriteLine($"bad: step {c.Step}: {p}");
                }
                o.WriteLine(v.Ok ? $"{v.Checkpoints.Length} checkpoint(s) verified in {v.RunDirectory}"
                    : $"{v.Checkpoints.Count(c => !c.Ok)} of {v.Checkpoints.Length} checkpoint(s) do not verify in {v.RunDirectory}");
                return true;
            case ShellEvents e:
                if (e.Oldest > 1) o.WriteLine($"(events before sequence number {e.Oldest} are not held: recovered from a snapshot, or beyond the last {Runtime.Journal.CoordinatorJournal.EventsKept})");
                if (e.Events.Length == 0) o.WriteLine("no events");
                else ShellText.Table(o, ["seq", "step", "kind", "event"], e.Events.Select(x => new[] { Num(x.SequenceNr), Num(x.AtStep), x.Kind, x.Text }));
                return true;
            case ShellActorTrees t:
                foreach (var node in t.Nodes)
                {
                    o.WriteLine(node.Answered ? $"{node.Node}{(node.Message.Length > 0 ? $" ({node.Message})" : "")}" : $"{node.Node}: {node.Message}");
                    foreach (var a in node.Actors)
                    {
                        var name = a.Depth == 0 ? a.Path : a.Path[(a.Path.LastIndexOf('/') + 1)..];
                        o.WriteLine($"  {new string(' ', 2 * a.Depth)}{name}{(a.Type.Length > 0 ? $"  [{a.Type}]" : "")}");
                    }
                }
                return true;
            case ShellDiagnosis d:
                ShellText.Table(o, ["node", "verdict", "status", "reachable", "workers", "planned", "data", "why"],
                    d.Nodes.Select(n => new[]
                    {
                        n.Node, n.Verdict.ToUpperInvariant(), n.Status, n.Reachable ? "yes" : "NO", Num(n.Workers), Num(n.Planned), Num(n.DataEndpoints), string.Join("; ", n.Reasons),
                    }));
                o.WriteLine($"run: {d.RunVerdict.ToUpperInvariant()}, phase {d.Phase}, {d.Step} step(s) committed" +
                            (d.MedianStepSeconds is { } m ? $", median step {m.ToString("F3", Inv)} s" : "") +
                            (d.StepInFlightSeconds is { } f ? $", step in flight for {f.ToString("F1", Inv)} s" : "") +
                            (d.RunReasons.Length > 0 ? ": " + string.Join("; ", d.RunReasons) : ""));
                o.WriteLine(d.Ok ? "all pass" : "not all pass");
                return true;
            default:
                return false;
        }
    }

    // Layers x experts, each cell coloured by its load relative to the layer's mean (1 = an even split).
    private static void Heatmap(TextWriter o, ShellExpertHeatmap h)
    {
        o.WriteLine($"tokens per expert per step, mean over the last {h.WindowSteps} step(s) up to step {h.Step + 1} (colour: load / layer mean)");
        var console = AnsiConsole.Create(new AnsiConsoleSettings
        {
            Out = new AnsiConsoleOutput(o),
            Ansi = TerminalColour.Enabled(o) ? AnsiSupport.Detect : AnsiSupport.No,
            ColorSystem = TerminalColour.Enabled(o) ? ColorSystemSupport.Detect : ColorSystemSupport.NoColors,
        });
        console.Profile.Width = Math.Max(console.Profile.Width, 40 + 8 * (h.Loads.Length == 0 ? 0 : h.Loads.Max(l => l.Length)));
        var table = new Table().Border(TableBorder.Simple);
        table.AddColumn("layer");
        int experts = h.Loads.Length == 0 ? 0 : h.Loads.Max(l => l.Length);
        for (int e = 0; e < experts; e++) table.AddColumn(new TableColumn(Num(e)).RightAligned());
        table.AddColumn("max/mean");
        for (int i = 0; i < h.Layers.Length; i++)
        {
            var loads = h.Loads[i];
            double mean = loads.Length == 0 ? 0 : loads.Average();
            var cells = new List<IRenderable> { new Text(Num(h.Layers[i])) };
            cells.AddRange(loads.Select(v => (IRenderable)new Markup($"[{ColourOf(mean > 0 ? v / mean : 0)}]{v.ToString("F1", Inv)}[/]")));
            cells.AddRange(Enumerable.Repeat<IRenderable>(new Text(""), experts - loads.Length));
            cells.Add(new Text(mean > 0 ? (loads.Max() / mean).ToString("F2", Inv) : "-"));
            table.AddRow(cells);
        }
        console.Write(table);
    }

    // Cold to hot: under half the mean blue, about even green, up to 1.5x yellow, up to 2x orange, beyond red.
    private static string ColourOf(double ratio) => ratio switch
    {
        < 0.5 => "blue",
        < 0.8 => "deepskyblue1",
        < 1.2 => "green",
        < 1.5 => "yellow",
        < 2.0 => "darkorange",
        _ => "red",
    };

    /// <summary>The heatmap as a PNG of <paramref name="size"/>: MoE layers up, experts across, load / layer mean in colour.</summary>
    public static void WriteHeatmapPng(ShellExpertHeatmap h, string path, PlotSize size)
    {
        int experts = h.Loads.Max(l => l.Length);
        var load = new double[h.Layers.Length, experts];
        double top = 1;
        for (int i = 0; i < h.Layers.Length; i++)
        {
            double mean = h.Loads[i].Length == 0 ? 0 : h.Loads[i].Average();
            for (int e = 0; e < experts; e++)
            {
                load[i, e] = e < h.Loads[i].Length && mean > 0 ? h.Loads[i][e] / mean : double.NaN;
                if (!double.IsNaN(load[i, e])) top = Math.Max(top, load[i, e]);
            }
        }
        using var plot = new Plot();
        PlotCommand.AddLoadHeatmap(plot, load, new CoordinateRect(-0.5, experts - 0.5, h.Layers[0] - 0.5, h.Layers[0] + h.Layers.Length - 0.5), top);
        plot.Axes.Bottom.TickGenerator = new ScottPlot.TickGenerators.NumericAutomatic { IntegerTicksOnly = true };
        plot.Title(string.Create(Inv, $"tokens per expert / layer mean, last {h.WindowSteps} step(s) up to step {h.Step + 1}"));
        plot.XLabel("expert");
        plot.YLabel("MoE block");
        plot.SavePng(path, size.Width, size.Height);
    }

    private static string Num(long v) => v.ToString(Inv);
}
