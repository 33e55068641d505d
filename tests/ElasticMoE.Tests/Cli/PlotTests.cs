using System.Buffers.Binary;
using System.Globalization;
using ElasticMoE.Cli;
using ElasticMoE.Training;

namespace ElasticMoE.Tests.Cli;

/// <summary><c>elasticmoe plot</c> and <c>train --plots</c>: PNGs of a metrics file, and what bad input gets.</summary>
public class PlotTests
{
    private static (int Code, string Out, string Err) Run(params string[] args) => CliTests.Run(args);

    private static readonly string[] Tiny = TestSupport.SetArguments(TestSupport.SmallSettings(("train.eval-every", "2")));

    /// <summary>Checks the PNG signature and that the IHDR chunk (always first) has the expected size.</summary>
    private static void AssertPng(string path, int width, int height)
    {
        var bytes = File.ReadAllBytes(path);
        Assert.True(bytes.Length > 33, $"{path} has {bytes.Length} bytes");
        Assert.Equal(new byte[] { 0x89, (byte)'P', (byte)'N', (byte)'G', 0x0D, 0x0A, 0x1A, 0x0A }, bytes[..8]);
        Assert.Equal(13, BinaryPrimitives.ReadInt32BigEndian(bytes.AsSpan(8)));
        Assert.Equal("IHDR", System.Text.Encoding.ASCII.GetString(bytes, 12, 4));
        Assert.Equal(width, BinaryPrimitives.ReadInt32BigEndian(bytes.AsSpan(16)));
        Assert.Equal(height, BinaryPrimitives.ReadInt32BigEndian(bytes.AsSpan(20)));
    }

    // Step lines as TrainingReport writes them, two MoE layers of four experts, expert 1 of layer 0
    // overloaded; events of each kind the runtime writes and one it does not (yet).
    private static string Synthetic(string dir, int steps = 40)
    {
        var lines = new List<string>();
        for (int s = 1; s <= steps; s++)
        {
            var val = s % 10 == 0 ? string.Create(CultureInfo.InvariantCulture, $",\"val_loss\":{3.0 - s * 0.01}") : "";
            lines.Add(string.Create(CultureInfo.InvariantCulture,
                $"{{\"step\":{s},\"loss\":{5.0 - s * 0.05}{val},\"tokens_per_s\":900,\"max_vio\":0.4,\"lr\":0.001,\"grad_norm\":0.7,\"seconds\":0.1,\"expert_counts\":[[10,40,10,4],[16,16,16,16]]}}"));
            if (s == 12) lines.Add("{\"event\":\"node-lost\",\"node\":\"akka.tcp://elasticmoe@127.0.0.1:4001\",\"step\":12,\"recovery_s\":1.5,\"replan_s\":null}");
            if (s == 20) lines.Add("{\"event\":\"node-joined\",\"node\":\"akka.tcp://elasticmoe@127.0.0.1:4002\",\"step\":20,\"recovery_s\":0.3}");
            if (s == 25) lines.Add("{\"event\":\"rebalance\",\"step\":25}");
            if (s == 30) lines.Add("{\"event\":\"checkpoint\",\"step\":30}");
            if (s == 35) lines.Add("{\"event\":\"something-new\",\"step\":35}");
        }
        var path = Path.Combine(dir, "metrics.jsonl");
        File.WriteAllLines(path, lines);
        return path;
    }

    [Fact]
    public void Plot_writes_both_pngs_at_the_requested_size_and_counts_bad_lines()
    {
        var dir = TestSupport.TempDir();
        var metrics = Synthetic(dir);
        var good = File.ReadAllLines(metrics).Length;
        File.AppendAllLines(metrics, ["not json", "{\"step\":\"x\",\"loss\":1}", "{\"step\":41,\"loss\":1,\"expert_counts\":[[1,\"a\"]]}", ""]);
        var outDir = Path.Combine(dir, "pictures");
        var (code, output, err) = Run("plot", "--metrics", metrics, "--out", outDir, "--width", "640", "--height", "480");
        Assert.True(code == 0, err);
        AssertPng(Path.Combine(outDir, "loss.png"), 640, 480);
        AssertPng(Path.Combine(outDir, "experts.png"), 640, 480);
        Assert.Contains($"skipped 3 unreadable line(s) of {metrics} (the first is line {good + 1})", err);
        Assert.Contains("wrote " + Path.Combine(outDir, "experts.png"), output);
    }

    [Fact]
    public void Metrics_file_reads_back_what_the_training_report_writes()
    {
        var path = Path.Combine(TestSupport.TempDir(), "m.jsonl");
        using (var report = new TrainingReport(TextWriter.Null, path))
        {
            report.Step(new StepResult(0, 5.5, 1e-3, 0.9, 0.2, [[3, 5], [4, 4]], 64, 0.1), null, 2);
            report.MembershipEvent("node-lost", "akka.tcp://elasticmoe@127.0.0.1:4001", 2, 1.25, new Dictionary<string, double> { ["replan_s"] = double.NaN });
            report.Step(new StepResult(1, double.NaN, 1e-3, 0.9, 0.2, [[8, 0], [2, 6]], 64, 0.1), 4.25, 2);
        }
        var file = MetricsFile.Read(path);
        Assert.Equal(0, file.SkippedLines);
        Assert.Equal([1L, 2L], file.Steps.Select(s => s.Step));
        Assert.Equal(5.5, file.Steps[0].Loss);
        Assert.Null(file.Steps[0].ValLoss);
        Assert.True(double.IsNaN(file.Steps[1].Loss), "a non-finite loss is written as null and read back as NaN");
        Assert.Equal(4.25, file.Steps[1].ValLoss);
        Assert.Equal([[8L, 0L], [2L, 6L]], file.Steps[1].ExpertCounts);
        Assert.Equal(new MetricsEvent("node-lost", 2, "akka.tcp://elasticmoe@127.0.0.1:4001"), Assert.Single(file.Events));
    }

    [Fact]
    public void Single_process_train_with_plots_and_no_metrics_file_writes_the_pngs()
    {
        var dir = Path.Combine(TestSupport.TempDir(), "plots");
        var before = Directory.GetFiles(Path.GetTempPath(), "elasticmoe-metrics-*.jsonl").ToHashSet();
        var (code, output, err) = Run(["train", "--single-process", "--steps", "4", "--plots", dir, "--plot-width", "500", "--plot-height", "300", .. Tiny]);
        Assert.True(code == 0, err);
        Assert.Contains("step     4/4", output);
        AssertPng(Path.Combine(dir, "loss.png"), 500, 300);
        AssertPng(Path.Combine(dir, "experts.png"), 500, 300);
        Assert.Equal(before, Directory.GetFiles(Path.GetTempPath(), "elasticmoe-metrics-*.jsonl").ToHashSet());   // the temporary metrics file is gone
    }

    [Fact]
    public void Cluster_train_with_plots_keeps_its_metrics_file_and_plots_it()
    {
        var dir = TestSupport.TempDir();
        var metrics = Path.Combine(dir, "m.jsonl");
        var plots = Path.Combine(dir, "plots");
        var (code, _, err) = Run(["train", "--steps", "3", "--metrics", metrics, "--plots", plots, .. Tiny]);
        Assert.True(code == 0, err);
        Assert.Equal(3, MetricsFile.Read(metrics).Steps.Count);
        AssertPng(Path.Combine(plots, "loss.png"), PlotCommand.DefaultWidth, PlotCommand.DefaultHeight);
        AssertPng(Path.Combine(plots, "experts.png"), PlotCommand.DefaultWidth, PlotCommand.DefaultHeight);
    }

    [Fact]
    public void A_missing_metrics_file_is_an_error_naming_it()
    {
        var missing = Path.Combine(TestSupport.TempDir(), "nope.jsonl");
        var (code, _, err) = Run("plot", "--metrics", missing, "--out", TestSupport.TempDir());
        Assert.Equal(Program.ExitCodes.BadInput, code);
        Assert.Contains($"metrics file not found: {missing}", err);
    }

    [Fact]
    public void An_empty_metrics_file_is_an_error_and_writes_nothing()
    {
        var dir = TestSupport.TempDir();
        var empty = Path.Combine(dir, "empty.jsonl");
        File.WriteAllText(empty, "");
        var outDir = Path.Combine(dir, "out");
        var (code, _, err) = Run("plot", "--metrics", empty, "--out", outDir);
        Assert.Equal(Program.ExitCodes.BadInput, code);
        Assert.Contains($"{empty} is empty: nothing to plot", err);
        Assert.False(Directory.Exists(outDir));
    }

    [Fact]
    public void A_file_with_no_readable_step_line_is_an_error_with_the_count()
    {
        var path = Path.Combine(TestSupport.TempDir(), "garbage.jsonl");
        File.WriteAllLines(path, ["garbage", "{\"loss\":1.0}", "{\"event\":\"node-lost\",\"step\":3}", "[1,2]"]);
        var (code, _, err) = Run("plot", "--metrics", path, "--out", TestSupport.TempDir());
        Assert.Equal(Program.ExitCodes.BadInput, code);
        Assert.Contains($"skipped 3 unreadable line(s) of {path} (the first is line 1)", err);
        Assert.Contains("has no step line to plot (3 unreadable line(s), 1 event line(s))", err);
    }

    [Fact]
    public void A_dense_model_gets_its_loss_plot_and_no_heatmap()
    {
        var dir = TestSupport.TempDir();
        var path = Path.Combine(dir, "dense.jsonl");
        File.WriteAllLines(path, ["{\"step\":1,\"loss\":5.0,\"expert_counts\":[]}", "{\"step\":2,\"loss\":4.0,\"val_loss\":4.5,\"expert_counts\":[]}"]);
        var (code, output, err) = Run("plot", "--metrics", path, "--out", dir);
        Assert.True(code == 0, err);
        AssertPng(Path.Combine(dir, "loss.png"), PlotCommand.DefaultWidth, PlotCommand.DefaultHeight);
        Assert.False(File.Exists(Path.Combine(dir, "experts.png")));
        Assert.Contains("has no expert counts (a dense model): no experts.png", output);
    }
}
