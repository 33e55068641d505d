using ElasticMoE.Cli;

namespace ElasticMoE.Tests.Cli;

/// <summary>The executable's entry point, run in-process with captured output.</summary>
public class CliTests
{
    /// <summary>Runs the CLI in this process; shared by the other CLI test classes.</summary>
    internal static (int Code, string Out, string Err) Run(params string[] args)
    {
        TestSupport.EnsureTorch();
        var o = new StringWriter();
        var e = new StringWriter();
        int code = Program.Run(args, o, e);
        return (code, o.ToString(), e.ToString());
    }

    private static readonly string[] Tiny =
    [
        "--set", "model.d-model=32", "--set", "model.layers=2", "--set", "model.heads=2", "--set", "model.context=16",
        "--set", "model.moe.routed-experts=4", "--set", "model.moe.expert-hidden=16", "--set", "model.dense-hidden=32",
        "--set", "train.global-batch=4", "--set", "train.micro-batch=2", "--set", "train.eval-every=2", "--set", "train.eval-batches=1",
        "--threads", "1",
    ];

    [Fact]
    public void Bench_reports_figures_against_baselines_of_the_same_run()
    {
        var json = Path.Combine(TestSupport.TempDir(), "bench.json");
        var (code, output, err) = Run(["bench", "--suite", "train", "--bench-steps", "2", "--json", json, .. Tiny]);
        Assert.True(code == 0, err);
        Assert.Contains("MFU", output);
        using var doc = System.Text.Json.JsonDocument.Parse(File.ReadAllText(json));
        var mfu = doc.RootElement.EnumerateArray().Single(f => f.GetProperty("Name").GetString() == "MFU").GetProperty("Value").GetDouble();
        Assert.InRange(mfu, 1e-6, 1.0);
        var flops = doc.RootElement.EnumerateArray().Single(f => f.GetProperty("Name").GetString() == "model FLOP/s");
        Assert.True(flops.GetProperty("BaselineValue").GetDouble() > 0, "the GEMM peak is measured in the same run");
    }

    [Fact]
    public void Bench_Placement_suite_prints_its_table_and_writes_its_figures()
    {
        var json = Path.Combine(TestSupport.TempDir(), "bench.json");
        var (code, output, err) = Run(["bench", "--suite", "placement", "--json", json, .. Tiny]);
        Assert.True(code == 0, err);
        Assert.Contains("EPLB, own count", output);
        Assert.Contains("ours from static round-robin", output);
        using var doc = System.Text.Json.JsonDocument.Parse(File.ReadAllText(json));
        var moved = doc.RootElement.EnumerateArray().Single(f => f.GetProperty("Name").GetString() == "P6 copies moved/rebalance (ours)");
        Assert.InRange(moved.GetProperty("Value").GetDouble(), 0, 0.10);
        Assert.True(moved.GetProperty("BaselineValue").GetDouble() > 0.5, "EPLB's churn on the same drift, same run");
    }

    [Fact]
    public void Bench_cluster_figure_is_the_round_with_the_median_ratio()
    {
        // (single, 1 node) per round: ratios 0.5, 1.2, 0.9 → the third round, whatever the absolute speeds.
        var rounds = new[] { (200.0, 100.0), (100.0, 120.0), (50.0, 45.0) };
        Assert.Equal(rounds[2], BenchCommand.MedianRound(rounds, r => r.Item2 / r.Item1));
        Assert.Equal(rounds[0], BenchCommand.MedianRound(rounds.Take(2).ToList(), r => r.Item2 / r.Item1));   // even count: the lower
    }

    [Fact]
    public void Train_writes_progress_and_json_metrics()
    {
        var metrics = Path.Combine(TestSupport.TempDir(), "m.jsonl");
        var (code, output, err) = Run(["train", "--steps", "4", "--metrics", metrics, .. Tiny]);
        Assert.True(code == 0, err);
        Assert.Contains("step     4/4", output);
        var lines = File.ReadAllLines(metrics);
        Assert.Equal(4, lines.Length);
        Assert.Equal((byte)'{', File.ReadAllBytes(metrics)[0]);   // plain JSON lines, no byte-order mark
        using var doc = System.Text.Json.JsonDocument.Parse(lines[1]);
        var root = doc.RootElement;
        Assert.Equal(2, root.GetProperty("step").GetInt32());
        Assert.True(root.GetProperty("loss").GetDouble() > 0);
        Assert.True(root.GetProperty("val_loss").GetDouble() > 0);
        Assert.True(root.GetProperty("tokens_per_s").GetDouble() > 0);
        Assert.True(root.GetProperty("max_vio").GetDouble() >= 0);
        Assert.False(System.Text.Json.JsonDocument.Parse(lines[0]).RootElement.TryGetProperty("val_loss", out _));
    }

    [Fact]
    public void Save_then_resume_continues_at_the_saved_step()
    {
        var dir = TestSupport.TempDir();
        var state = Path.Combine(dir, "run");
        var (code, _, err) = Run(["train", "--single-process", "--steps", "2", "--save", state, .. Tiny]);
        Assert.True(code == 0, err);
        (code, var output, err) = Run(["train", "--single-process", "--steps", "3", "--resume", state, .. Tiny]);
        Assert.True(code == 0, err);
        Assert.Contains("at step 2", output);
        Assert.Contains("step     3/3", output);
        Assert.DoesNotContain("step     1/3", output);
    }

    [Fact]
    public void Train_runs_on_a_two_node_local_cluster_by_flag()
    {
        var metrics = Path.Combine(TestSupport.TempDir(), "m.jsonl");
        var (code, output, err) = Run(["train", "--nodes", "2", "--steps", "3", "--metrics", metrics, .. Tiny]);
        Assert.True(code == 0, err + output);
        Assert.Contains("DP 2 x PP 1", output);
        Assert.Contains("step     3/3", output);
        Assert.Equal(3, File.ReadAllLines(metrics).Length);
    }

    [Fact]
    public void A_diverging_cluster_run_stops_naming_the_step()
    {
        var (code, _, err) = Run(["train", "--nodes", "1", "--steps", "3", "--set", "train.lr=1e30", "--set", "train.grad-clip=0", "--set", "train.warmup-steps=0", .. Tiny]);
        Assert.Equal(Program.ExitCodes.Diverged, code);
        Assert.Matches("diverged at step \\d", err);
    }

    [Fact]
    public void Save_without_single_process_is_a_clear_error()
    {
        var (code, _, err) = Run(["train", "--steps", "1", "--save", Path.Combine(TestSupport.TempDir(), "s.bin"), .. Tiny]);
        Assert.Equal(Program.ExitCodes.BadInput, code);
        Assert.Contains("--single-process", err);
    }

    [Theory]
    [InlineData("node", "10.231.0.99", "", "not an address of this machine")]        // the data plane's bind
    [InlineData("train", "10.231.0.99", "", "must be an address of this machine")]   // remoting's bind (a coordinator)
    [InlineData("node", "0.0.0.0", "", "must be set when cluster.host is \"0.0.0.0\"")]
    [InlineData("node", "127.0.0.1", "not a host!", "cluster.public-host")]
    public void Addresses_a_process_cannot_listen_on_or_advertise_are_clear_errors_at_start(string command, string host, string publicHost, string reason)
    {
        // 10.231.0.99 is on no interface of this machine (nor anywhere it can reach): binding it fails locally at once.
        string[] args = command == "node" ? ["node", "--seed-node", "akka.tcp://elasticmoe@127.0.0.1:1"] : ["train", "--nodes", "0", "--expect-nodes", "1"];
        var (code, _, err) = Run([.. args, "--set", $"cluster.host={host}", "--set", $"cluster.public-host={publicHost}", .. Tiny]);
        Assert.Equal(Program.ExitCodes.BadInput, code);
        Assert.Contains(reason, err);
    }

    [Theory]
    [InlineData("--steps", "-5")]
    [InlineData("--steps", "abc")]
    [InlineData("--threads", "-1")]
    [InlineData("--set", "novalue")]
    [InlineData("--bogus-flag", "1")]
    public void Invalid_flags_are_usage_errors(string flag, string value)
    {
        var (code, _, err) = Run("train", flag, value);
        Assert.Equal(Program.ExitCodes.Usage, code);
        Assert.False(string.IsNullOrWhiteSpace(err));
    }

    [Fact]
    public void A_missing_data_file_is_a_clear_error()
    {
        var (code, _, err) = Run("train", "--data", "/nonexistent/data.txt", "--steps", "1");
        Assert.Equal(Program.ExitCodes.BadInput, code);
        Assert.Contains("data file not found: /nonexistent/data.txt", err);
    }

    [Fact]
    public void An_unknown_config_key_is_a_clear_error()
    {
        var path = Path.Combine(TestSupport.TempDir(), "bad.conf");
        File.WriteAllText(path, "elasticmoe.model.moe.top_k = 2");
        var (code, _, err) = Run("train", "--config", path, "--steps", "1");
        Assert.Equal(Program.ExitCodes.BadInput, code);
        Assert.Contains("elasticmoe.model.moe.top_k", err);
        Assert.Contains(path, err);
    }

    [Fact]
    public void A_diverging_run_stops_with_the_step_and_leaves_no_state_behind()
    {
        var dir = TestSupport.TempDir();
        var state = Path.Combine(dir, "run");
        var (code, _, err) = Run(["train", "--single-process", "--steps", "3", "--save", state, "--set", "train.lr=1e30", "--set", "train.grad-clip=0", "--set", "train.warmup-steps=0", .. Tiny]);
        Assert.Equal(Program.ExitCodes.Diverged, code);
        Assert.Matches("diverged at step \\d", err);
        Assert.False(Directory.Exists(state), "no checkpoint directory for a diverged run");
    }
}
