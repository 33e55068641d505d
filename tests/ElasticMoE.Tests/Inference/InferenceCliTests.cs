using System.Text.Json;
using ElasticMoE.Inference;
using ElasticMoE.Tests.Cli;
using ElasticMoE.Training;

namespace ElasticMoE.Tests.Inference;

/// <summary><c>elasticmoe generate</c> and <c>eval</c> on a tiny model trained by the CLI in this process.</summary>
public class InferenceCliTests
{
    private static readonly string[] Tiny =
    [
        "--set", "model.d-model=32", "--set", "model.layers=2", "--set", "model.heads=2", "--set", "model.context=16",
        "--set", "model.moe.routed-experts=4", "--set", "model.moe.expert-hidden=16", "--set", "model.dense-hidden=32",
        "--set", "train.global-batch=4", "--set", "train.micro-batch=2", "--set", "train.eval-every=4", "--set", "train.eval-batches=2",
        "--threads", "1",
    ];

    /// <summary>A run directory of 12 steps with a checkpoint every 4 and its metrics file.</summary>
    private static (string Run, string Metrics) Trained()
    {
        var dir = TestSupport.TempDir();
        var run = Path.Combine(dir, "run");
        var metrics = Path.Combine(dir, "metrics.jsonl");
        var (code, _, err) = CliTests.Run(["train", "--single-process", "--steps", "12", "--save", run, "--save-every", "4", "--keep", "10", "--metrics", metrics, .. Tiny]);
        Assert.True(code == 0, err);
        return (run, metrics);
    }

    private static readonly string[] Sampled = ["--max-tokens", "40", "--temperature", "0.9", "--top-k", "50", "--top-p", "0.95", "--prompt", "alice:"];

    [Fact]
    public void Generate_with_the_same_seed_prints_the_same_bytes_and_another_seed_other_text()
    {
        var (run, _) = Trained();
        var first = CliTests.Run(["generate", "--from", run, "--seed", "7", .. Sampled]);
        var second = CliTests.Run(["generate", "--from", run, "--seed", "7", .. Sampled]);
        var other = CliTests.Run(["generate", "--from", run, "--seed", "8", .. Sampled]);
        Assert.True(first.Code == 0, first.Err);
        Assert.StartsWith("alice:", first.Out);
        Assert.True(first.Out.Length > "alice:".Length + 10, first.Out);
        Assert.Equal(first.Out, second.Out);
        Assert.NotEqual(first.Out, other.Out);
        Assert.Matches(@"40 tokens in .* tokens/s with the KV cache", first.Err);
    }

    [Fact]
    public void Generate_compare_reports_tokens_per_second_with_and_without_the_cache_and_the_same_tokens()
    {
        var (run, _) = Trained();
        var (code, _, err) = CliTests.Run(["generate", "--from", run, "--compare", "--temperature", "0", "--max-tokens", "40", "--prompt", "bob"]);
        Assert.True(code == 0, err);
        Assert.Matches(@"tokens/s with the KV cache", err);
        Assert.Matches(@"tokens/s without the KV cache; the same tokens: yes", err);
    }

    [Fact]
    public void Eval_at_each_checkpoint_equals_the_validation_loss_training_reported_at_that_step()
    {
        var (run, metrics) = Trained();
        var reported = MetricsFile.Read(metrics).Steps.Where(s => s.ValLoss is not null).ToDictionary(s => s.Step, s => s.ValLoss!.Value);
        Assert.Equal([4L, 8L, 12L], reported.Keys.Order());
        foreach (var (step, val) in reported)
        {
            var (code, output, err) = CliTests.Run(["eval", "--from", run, "--step", step.ToString(System.Globalization.CultureInfo.InvariantCulture), "--json"]);
            Assert.True(code == 0, err);
            using var doc = JsonDocument.Parse(output);
            var natsPerToken = doc.RootElement.GetProperty("nats_per_token").GetDouble();
            Assert.True(Math.Abs(natsPerToken - val) <= 1e-6, $"step {step}: eval {natsPerToken}, training reported {val}");
            Assert.Equal(step, doc.RootElement.GetProperty("step").GetInt64());
            Assert.Equal(natsPerToken, doc.RootElement.GetProperty("nats_per_byte").GetDouble()); // bytes: one token a byte
            Assert.Equal(Math.Exp(natsPerToken), doc.RootElement.GetProperty("perplexity").GetDouble(), 12);
        }
    }

    [Fact]
    public void An_exported_model_generates_and_evaluates_as_its_run_directory()
    {
        var (run, _) = Trained();
        var model = Path.Combine(TestSupport.TempDir(), "model.safetensors");
        var export = CliTests.Run(["checkpoints", "export", "--run-dir", run, "--out", model]);
        Assert.True(export.Code == 0, export.Err);
        var fromDir = CliTests.Run(["generate", "--from", run, "--seed", "3", .. Sampled]);
        var fromFile = CliTests.Run(["generate", "--model", model, "--seed", "3", .. Sampled]);
        Assert.True(fromFile.Code == 0, fromFile.Err);
        Assert.Equal(fromDir.Out, fromFile.Out);
        var evalDir = CliTests.Run(["eval", "--from", run, "--json"]);
        var evalFile = CliTests.Run(["eval", "--from", model, "--json"]);
        Assert.True(evalFile.Code == 0, evalFile.Err);
        double Nats(string json) => JsonDocument.Parse(json).RootElement.GetProperty("nats_per_token").GetDouble();
        Assert.Equal(Nats(evalDir.Out), Nats(evalFile.Out));
    }

    [Fact]
    public void Eval_on_a_file_reports_nats_per_token_and_per_byte()
    {
        var (run, _) = Trained();
        var text = Path.Combine(TestSupport.TempDir(), "text.txt");
        File.WriteAllText(text, string.Concat(Enumerable.Repeat("the quick fox sees the lazy dog near the river at dawn.\n", 20)));
        var (code, output, err) = CliTests.Run(["eval", "--from", run, "--file", text]);
        Assert.True(code == 0, err);
        Assert.Matches(@"nats/token, .* nats/byte \(.* bits/byte\), perplexity .* over 1,119 tokens \(bytes\)", output);
    }

    [Fact]
    public void Bad_input_is_a_clear_error_and_exit_2()
    {
        var (run, _) = Trained();
        var missing = Path.Combine(TestSupport.TempDir(), "nothing-here");
        var empty = TestSupport.TempDir();
        var garbage = Path.Combine(empty, "garbage.safetensors");
        File.WriteAllText(garbage, "not a model");
        var otherData = Path.Combine(empty, "other.txt");
        File.WriteAllText(otherData, string.Concat(Enumerable.Repeat("some other corpus than the run's. ", 100)));
        (string[] Args, string Message)[] cases =
        [
            (["generate", "--from", missing, "--prompt", "a"], "no run directory or exported model"),
            (["generate", "--from", empty, "--prompt", "a"], "no committed checkpoint"),
            (["generate", "--from", garbage, "--prompt", "a"], "not a safetensors file"),
            (["generate", "--from", run, "--temperature", "-1"], "--temperature"),
            (["generate", "--from", run, "--top-p", "0"], "--top-p"),
            (["generate", "--from", run, "--top-k", "-3"], "--top-k"),
            (["generate", "--from", run, "--max-tokens", "0"], "--max-tokens"),
            (["eval", "--from", run, "--step", "5"], "no committed checkpoint of step 5"),
            (["eval", "--from", run, "--data", otherData], "not the data the run trained on"),
            (["eval", "--from", run, "--file", missing], "text file not found"),
        ];
        foreach (var (args, message) in cases)
        {
            var (code, _, err) = CliTests.Run(args);
            Assert.True(code == 2, $"{string.Join(' ', args)}: exit {code}, {err}");
            Assert.Contains(message, err);
        }
    }
}

/// <summary>The same commands on a model trained with the GPT-2 BPE tokenizer.</summary>
public class Gpt2InferenceTests
{
    [Fact]
    public void A_gpt2_run_generates_text_and_evaluates_to_its_reported_validation_loss_with_nats_per_byte_below_per_token()
    {
        var dir = TestSupport.TempDir();
        var run = Path.Combine(dir, "run");
        var metrics = Path.Combine(dir, "m.jsonl");
        string[] tiny =
        [
            "--set", "data.tokenizer=gpt2", "--set", "model.d-model=32", "--set", "model.layers=2", "--set", "model.heads=2", "--set", "model.context=16",
            "--set", "model.moe.routed-experts=4", "--set", "model.moe.expert-hidden=16", "--set", "model.dense-hidden=32",
            "--set", "train.global-batch=4", "--set", "train.micro-batch=2", "--set", "train.eval-batches=2", "--threads", "1",
        ];
        var train = CliTests.Run(["train", "--single-process", "--steps", "6", "--save", run, "--metrics", metrics, .. tiny]);
        Assert.True(train.Code == 0, train.Err);
        Assert.Contains("gpt2 tokens", train.Out);
        var reported = MetricsFile.Read(metrics).Steps.Single(s => s.Step == 6).ValLoss!.Value;
        var eval = CliTests.Run(["eval", "--from", run, "--json"]);
        Assert.True(eval.Code == 0, eval.Err);
        using var doc = JsonDocument.Parse(eval.Out);
        var perToken = doc.RootElement.GetProperty("nats_per_token").GetDouble();
        Assert.True(Math.Abs(perToken - reported) <= 1e-6, $"eval {perToken}, training reported {reported}");
        Assert.Equal("gpt2", doc.RootElement.GetProperty("tokenizer").GetString());
        // A GPT-2 token holds several bytes of this text.
        Assert.True(doc.RootElement.GetProperty("bytes").GetInt64() > 2 * doc.RootElement.GetProperty("tokens").GetInt64());
        Assert.True(doc.RootElement.GetProperty("nats_per_byte").GetDouble() < perToken / 2);
        var gen = CliTests.Run(["generate", "--from", run, "--prompt", "alice:", "--max-tokens", "10", "--seed", "1"]);
        Assert.True(gen.Code == 0, gen.Err);
        Assert.StartsWith("alice:", gen.Out);
        Assert.Contains("10 tokens in", gen.Err);
        Assert.Contains("gpt2", gen.Err);
        Assert.Equal(gen.Out, CliTests.Run(["generate", "--from", run, "--prompt", "alice:", "--max-tokens", "10", "--seed", "1"]).Out);
    }
}
