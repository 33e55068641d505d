using System.CommandLine;
using System.Globalization;
using ElasticMoE.Training;
using ScottPlot;

namespace ElasticMoE.Cli;

/// <summary>
/// <c>elasticmoe plot --metrics FILE --out DIR</c> (and <c>train --plots DIR</c>): PNGs of a run's metrics
/// file. <c>loss.png</c> has the training and validation loss over steps with every event line of the file
/// (membership changes, rebalances, checkpoints, ...) marked; <c>experts.png</c> has one expert-load
/// heatmap per MoE layer, experts against steps.
/// </summary>
public static class PlotCommand
{
    public const int DefaultWidth = 1200, DefaultHeight = 700;
    public const string LossFile = "loss.png", ExpertsFile = "experts.png";

    public static Command Create(TextWriter stdout, TextWriter stderr)
    {
        var metrics = new Option<string>("--metrics") { Description = "metrics file written by train --metrics", Required = true };
        var output = new Option<string>("--out") { Description = $"folder to write {LossFile} and {ExpertsFile} into (created if missing)", Required = true };
        var size = new PlotSizeOptions("--width", "--height");
        var cmd = new Command("plot", "write PNGs of a metrics file: loss curves with events marked, expert-load heatmaps");
        cmd.Options.Add(metrics);
        cmd.Options.Add(output);
        size.AddTo(cmd);
        cmd.SetAction(p => Program.Guard(stderr, () => Write(p.GetValue(metrics)!, p.GetValue(output)!, size.Get(p), stdout, stderr)));
        return cmd;
    }

    /// <summary>Reads <paramref name="metricsPath"/> and writes the PNGs into <paramref name="outDir"/>.</summary>
    /// <exception cref="FileNotFoundException">No such metrics file.</exception>
    /// <exception cref="InvalidDataException">The file has no step line that could be read.</exception>
    public static int Write(string metricsPath, string outDir, PlotSize size, TextWriter stdout, TextWriter stderr)
    {
        var file = MetricsFile.Read(metricsPath);
        if (file.SkippedLines > 0)
            stderr.WriteLine($"warning: skipped {file.SkippedLines} unreadable line(s) of {metricsPath} (the first is line {file.FirstSkippedLine})");
        if (file.Steps.Count == 0)
        {
            throw new InvalidDataException(file.SkippedLines == 0 && file.Events.Count == 0
                ? $"{metricsPath} is empty: nothing to plot"
                : $"{metricsPath} has no step line to plot ({file.SkippedLines} unreadable line(s), {file.Events.Count} event line(s))");
        }
        var loss = Path.Combine(outDir, LossFile);
        var experts = Path.Combine(outDir, ExpertsFile);
        bool dense = file.Steps.All(s => s.ExpertCounts.Length == 0);
        try
        {
            Directory.CreateDirectory(outDir);
            using (var plot = LossPlot(file)) plot.SavePng(loss, size.Width, size.Height);
            stdout.WriteLine($"wrote {loss}");
            if (!dense)
            {
                ExpertPlots(file, size.Width).SavePng(experts, size.Width, size.Height);
                stdout.WriteLine($"wrote {experts}");
            }
        }
        catch (Exception ex) when (ex is IOException or UnauthorizedAccessException)
        {
            stderr.WriteLine($"error: cannot write the plots into {outDir}: {ex.Message}");
            return Program.ExitCodes.BadInput;
        }
        if (dense) stdout.WriteLine($"{metricsPath} has no expert counts (a dense model): no {ExpertsFile}");
        return Program.ExitCodes.Ok;
    }

    /// <summary>
    /// Runs <paramref name="train"/> (given the metrics path to write) and then, if <paramref name="plotsDir"/> is set, writes the plots of its
    /// metrics file, whether it finished, was stopped or failed (a diverged curve is worth seeing too).
    /// </summary>
    /// <remarks>
    /// Without <c>--metrics</c> the run writes to a temporary file, deleted after plotting: asking for
    /// pictures should not also require naming a file one did not want. A run that succeeded but whose
    /// plots could not be written exits with the plot's error code; a failed run keeps its own.
    /// </remarks>
    public static int TrainThenPlot(string? plotsDir, string? metrics, PlotSize size, TextWriter stdout, TextWriter stderr, Func<string?, int> train)
    {
        if (plotsDir is null) return train(metrics);
        var path = metrics ?? Path.Combine(Path.GetTempPath(), $"elasticmoe-metrics-{Guid.NewGuid():N}.jsonl");
        int code = Program.ExitCodes.Failed;
        try
        {
            code = train(path);
        }
        finally
        {
            int plotted = Program.Guard(stderr, () => Write(path, plotsDir, size, stdout, stderr));
            if (code == Program.ExitCodes.Ok) code = plotted;
            if (metrics is null) File.Delete(path);
        }
        return code;
    }

    // Fixed colours for the kinds the runtime writes, so the same event looks the same in every picture;
    // a kind not listed takes the next colour of the palette.
    private static readonly Dictionary<string, Color> KindColors = new(StringComparer.Ordinal)
    {
        ["node-lost"] = Colors.Red,
        ["node-joined"] = Colors.Green,
        ["node-left"] = Colors.Orange,
        ["worker-retired"] = Colors.Purple,
        ["rebalance"] = Colors.DodgerBlue,
        ["checkpoint"] = Colors.Gray,
    };

    private static Plot LossPlot(MetricsFile file)
    {
        var plot = new Plot();
        var train = file.Steps.Where(s => double.IsFinite(s.Loss)).ToArray();
        if (train.Length > 0)
        {
            var line = plot.Add.ScatterLine(train.Select(s => (double)s.Step).ToArray(), train.Select(s => s.Loss).ToArray());
            line.LegendText = "training loss";
            line.LineWidth = 1.5f;
        }
        var val = file.Steps.Where(s => s.ValLoss is { } v && double.IsFinite(v)).ToArray();
        if (val.Length > 0)
        {
            var points = plot.Add.Scatter(val.Select(s => (double)s.Step).ToArray(), val.Select(s => s.ValLoss!.Value).ToArray());
            points.LegendText = "validation loss";
            points.LineWidth = 2;
            points.MarkerSize = 7;
        }
        var palette = new ScottPlot.Palettes.Category10();
        var colors = new Dictionary<string, Color>(KindColors, StringComparer.Ordinal);
        var legended = new HashSet<string>(StringComparer.Ordinal);
        foreach (var e in file.Events)
        {
            if (!colors.TryGetValue(e.Kind, out var color))
                colors[e.Kind] = color = palette.GetColor(colors.Count);
            var mark = plot.Add.VerticalLine(e.Step, 1.5f, color, LinePattern.Dashed);
            mark.Text = e.Kind;
            mark.LabelOppositeAxis = true;   // labels along the top, clear of the step numbers
            mark.LabelFontSize = 10;
            mark.LegendText = e.Kind;
            mark.ExcludeFromLegend = !legended.Add(e.Kind);   // one legend entry per kind
        }
        // No title: the event labels run along the top edge, where it would sit, and need its room.
        plot.Axes.Top.MinimumSize = 24;
        plot.XLabel("step");
        plot.YLabel("loss");
        plot.ShowLegend(Alignment.UpperRight);
        return plot;
    }

    private static Multiplot ExpertPlots(MetricsFile file, int widthPixels)
    {
        int layers = file.Steps.Max(s => s.ExpertCounts.Length);
        var heatmaps = Enumerable.Range(0, layers).Select(l => ExpertLoad.Of(file.Steps, l, widthPixels)).ToArray();
        // One colour scale for every layer, so the same colour means the same imbalance in each panel.
        double top = Math.Max(heatmaps.Max(h => h.Max), 1);
        var multiplot = new Multiplot();
        multiplot.AddPlots(layers);
        for (int l = 0; l < layers; l++)
        {
            var plot = multiplot.GetPlot(l);
            var h = heatmaps[l];
            AddLoadHeatmap(plot, h.Load, new CoordinateRect(h.FirstStep - 0.5, h.FirstStep - 0.5 + h.Columns * h.StepsPerColumn, -0.5, h.Experts - 0.5), top);
            plot.Title(string.Create(CultureInfo.InvariantCulture,
                $"MoE layer {l}: tokens per expert / mean (1 = balanced){(h.StepsPerColumn > 1 ? $", {h.StepsPerColumn} steps a column" : "")}"));
            plot.XLabel("step");
            plot.YLabel("expert");
        }
        return multiplot;
    }

    /// <summary>
    /// A heatmap of loads relative to an even split (<paramref name="load"/>[row, column], row 0 at the bottom of
    /// <paramref name="rect"/>) on the colour scale [0, <paramref name="top"/>], with its colour bar and integer row ticks:
    /// the expert-load picture of <c>plot</c> and of the shell's <c>experts heatmap --png</c>.
    /// </summary>
    public static void AddLoadHeatmap(Plot plot, double[,] load, CoordinateRect rect, double top)
    {
        var map = plot.Add.Heatmap(load);
        map.Rectangle = rect;
        map.FlipVertically = true;   // row 0 at the bottom, where the y axis says 0
        map.ManualRange = new ScottPlot.Range(0, top);
        map.Colormap = new ScottPlot.Colormaps.Viridis();
        map.NaNCellColor = Colors.Transparent;   // cells with nothing to show (steps the file has no line for)
        var bar = plot.Add.ColorBar(map);
        bar.Label = "load / mean";
        plot.Axes.Left.TickGenerator = new ScottPlot.TickGenerators.NumericAutomatic { IntegerTicksOnly = true };
    }

    /// <summary>One layer's heatmap: rows are experts, columns runs of steps, each cell the expert's share of
    /// the layer's tokens relative to an even split (NaN where no step of the column has counts).</summary>
    private sealed record ExpertLoad(double[,] Load, long FirstStep, int StepsPerColumn, int Experts, double Max)
    {
        public int Columns => Load.GetLength(1);

        public static ExpertLoad Of(IReadOnlyList<MetricsStep> steps, int layer, int widthPixels)
        {
            var withLayer = steps.Where(s => s.ExpertCounts.Length > layer && s.ExpertCounts[layer].Sum() > 0).ToArray();
            int experts = Math.Max(1, withLayer.Length == 0 ? 0 : withLayer.Max(s => s.ExpertCounts[layer].Length));
            long first = withLayer.Length == 0 ? steps[0].Step : withLayer.Min(s => s.Step);
            long span = withLayer.Length == 0 ? 1 : withLayer.Max(s => s.Step) - first + 1;
            // At most one column per pixel: more could not be told apart, and a long run (or a stray step
            // number) must not size the array.
            int perColumn = (int)Math.Min(int.MaxValue, (span + widthPixels - 1) / widthPixels);
            int columns = (int)((span + perColumn - 1) / perColumn);
            var sum = new double[experts, columns];
            var n = new int[columns];
            foreach (var s in withLayer)
            {
                var counts = s.ExpertCounts[layer];
                double mean = (double)counts.Sum() / experts;
                int c = (int)((s.Step - first) / perColumn);
                n[c]++;
                for (int e = 0; e < counts.Length; e++) sum[e, c] += counts[e] / mean;
            }
            double max = 0;
            for (int c = 0; c < columns; c++)
            for (int e = 0; e < experts; e++)
            {
                sum[e, c] = n[c] == 0 ? double.NaN : sum[e, c] / n[c];
                if (n[c] > 0) max = Math.Max(max, sum[e, c]);
            }
            return new ExpertLoad(sum, first, perColumn, experts, max);
        }
    }
}

/// <summary>The <c>--width</c>/<c>--height</c> of the PNGs, shared by <c>plot</c> and <c>train --plots</c>.</summary>
public sealed record PlotSize(int Width, int Height);

public sealed class PlotSizeOptions(string widthName, string heightName)
{
    public Option<int?> Width { get; } = RunConfigOptions.Positive(widthName, $"width of each PNG in pixels (default {PlotCommand.DefaultWidth})");
    public Option<int?> Height { get; } = RunConfigOptions.Positive(heightName, $"height of each PNG in pixels (default {PlotCommand.DefaultHeight})");

    public void AddTo(Command c)
    {
        c.Options.Add(Width);
        c.Options.Add(Height);
    }

    public PlotSize Get(ParseResult p) => new(p.GetValue(Width) ?? PlotCommand.DefaultWidth, p.GetValue(Height) ?? PlotCommand.DefaultHeight);
}
