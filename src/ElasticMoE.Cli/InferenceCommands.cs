using System.CommandLine;
using System.Globalization;
using System.Text.Json;
using ElasticMoE.Configuration;
using ElasticMoE.Data;
using ElasticMoE.Inference;

namespace ElasticMoE.Cli;

/// <summary>
/// <c>elasticmoe generate</c> and <c>elasticmoe eval</c>: use a trained model, from a run directory (a cluster's
/// <c>--run-dir</c> or a <c>--save</c> directory) or an exported safetensors file.
/// </summary>
public static class InferenceCommands
{
    private static Option<string> From() => new("--from", "--run-dir", "--model")
    {
        Description = "a run directory (train --run-dir or --save: its newest checkpoint that verifies) or a model file written by `checkpoints export`",
        Required = true,
    };

    private static Option<int> Threads() => new("--threads") { Description = "libtorch threads (0 = all cores)", DefaultValueFactory = _ => 1 };

    public static Command Generate(TextWriter stdout, TextWriter stderr, Func<TextReader?>? stdin = null)
    {
        var from = From();
        var prompt = new Option<string?>("--prompt") { Description = "the text to continue (default: standard input when it is not a terminal, else a newline)" };
        var maxTokens = new Option<int>("--max-tokens") { Description = "tokens to generate", DefaultValueFactory = _ => 200 };
        var temperature = new Option<double>("--temperature") { Description = "sampling temperature; 0 = greedy", DefaultValueFactory = _ => 0.8 };
        var topK = new Option<int>("--top-k") { Description = "draw only among the K most likely tokens (0 = all)", DefaultValueFactory = _ => 0 };
        var topP = new Option<double>("--top-p") { Description = "draw only among the most likely tokens whose probability reaches P (1 = all)", DefaultValueFactory = _ => 1.0 };
        var seed = new Option<ulong>("--seed") { Description = "seed of the sampler: the same seed gives the same text", DefaultValueFactory = _ => 0 };
        var noCache = new Option<bool>("--no-cache") { Description = "run the whole window through the model for every token instead of keeping a KV cache" };
        var compare = new Option<bool>("--compare") { Description = "also generate without the KV cache (not printed), and report both tokens/s and whether the texts agree" };
        var threads = Threads();
        var cmd = new Command("generate", "continue a prompt with a trained model, streaming the text; tokens/s at the end (on stderr)");
        foreach (var o in new Option[] { from, prompt, maxTokens, temperature, topK, topP, seed, noCache, compare, threads }) cmd.Options.Add(o);
        cmd.SetAction(p => Program.Guard(stderr, () =>
        {
            var sampling = new SamplingOptions(p.GetValue(temperature), p.GetValue(topK), p.GetValue(topP), p.GetValue(seed));
            int max = p.GetValue(maxTokens);
            Check(() => sampling.Validate());
            if (max <= 0) throw new ConfigException($"--max-tokens must be positive, got {max}");
            var text = p.GetValue(prompt) ?? ReadStdin(stdin);
            using var trained = Load(p.GetValue(from)!, null, p.GetValue(threads), stderr);
            var tokenizer = trained.Tokenizer;
            var promptTokens = tokenizer.Encode(string.IsNullOrEmpty(text) ? "\n" : text);
            var stream = new TextStream(tokenizer);
            stdout.Write(text);
            stdout.Flush();
            bool cache = !p.GetValue(noCache);
            // Both paths once, briefly, before either is timed: the first forward of a process JITs and allocates.
            if (p.GetValue(compare))
                foreach (var warm in new[] { true, false }) TextGeneration.Run(trained.Model, promptTokens, Math.Min(max, 8), sampling, warm);
            var result = TextGeneration.Run(trained.Model, promptTokens, max, sampling, cache, token =>
            {
                var piece = stream.Push(token);
                if (piece.Length == 0) return;
                stdout.Write(piece);
                stdout.Flush();
            });
            stdout.Write(stream.Flush());
            stdout.WriteLine();
            stdout.Flush();
            var kind = cache ? $"({CacheKind(trained.Model.Options)}) " : "";
            stderr.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"{result.Tokens.Count} tokens in {result.Seconds:F2} s: {result.TokensPerSecond:F1} tokens/s {(cache ? "with" : "without")} the KV cache {kind}" +
                $"(prompt {promptTokens.Length} tokens, {tokenizer.Name}; step {trained.Step} of {trained.Source})"));
            if (p.GetValue(compare))
            {
                var other = TextGeneration.Run(trained.Model, promptTokens, max, sampling, !cache);
                bool same = other.Tokens.SequenceEqual(result.Tokens);
                stderr.WriteLine(string.Create(CultureInfo.InvariantCulture,
                    $"{other.Tokens.Count} tokens in {other.Seconds:F2} s: {other.TokensPerSecond:F1} tokens/s {(cache ? "without" : "with")} the KV cache; " +
                    $"the same tokens: {(same ? "yes" : "NO")}; the KV cache is {(cache ? result.TokensPerSecond / other.TokensPerSecond : other.TokensPerSecond / result.TokensPerSecond):F2}x as fast"));
            }
            return Program.ExitCodes.Ok;
        }));
        return cmd;
    }

    /// <summary>What the cache keeps: MLA's is the compressed latent, read by the absorbed form.</summary>
    private static string CacheKind(ModelOptions m) => m.Attention == AttentionKind.Mla
        ? $"MLA latent, {m.KvElementsPerToken} elements per token and layer, absorbed form"
        : $"MHA keys and values, {m.KvElementsPerToken} elements per token and layer";

    public static Command Eval(TextWriter stdout, TextWriter stderr)
    {
        var from = From();
        var step = new Option<long?>("--step") { Description = "evaluate this step's checkpoint of the run directory (default: the newest that verifies)" };
        var file = new Option<string?>("--file") { Description = "evaluate on this text file, whole (default: the run's own validation split)" };
        var data = new Option<string?>("--data") { Description = "the run's validation split: the data file the run trained on (default: the embedded corpus)" };
        var fraction = new Option<double?>("--validation-fraction") { Description = "the run's validation split: its data.validation-fraction (default: the configured default)" };
        var json = new Option<bool>("--json") { Description = "print one JSON object (full precision) instead of a line" };
        var threads = Threads();
        var cmd = new Command("eval", "validation loss of a trained model (nats/token, nats/byte, perplexity) on the run's validation split or a file");
        foreach (var o in new Option[] { from, step, file, data, fraction, json, threads }) cmd.Options.Add(o);
        cmd.SetAction(p => Program.Guard(stderr, () =>
        {
            if (p.GetValue(file) is not null && (p.GetValue(data) is not null || p.GetValue(fraction) is not null))
                throw new ConfigException("--file evaluates on a file of its own; --data and --validation-fraction describe the run's validation split");
            using var trained = Load(p.GetValue(from)!, p.GetValue(step), p.GetValue(threads), stderr);
            EvalResult result;
            string on;
            if (p.GetValue(file) is { } path)
            {
                if (!File.Exists(path)) throw new FileNotFoundException($"text file not found: {path}", path);
                result = Evaluation.OnTokens(trained.Model, trained.Tokenizer.Encode(File.ReadAllBytes(path)), trained.Tokenizer, trained.Run.TrainInt(nameof(TrainOptions.MicroBatch)));
                on = path;
            }
            else
            {
                var validation = p.GetValue(fraction) ?? ConfigLoader.Load().Data.ValidationFraction;
                var corpus = TextCorpus.Load(p.GetValue(data), validation, trained.Run.Model.Context, trained.Tokenizer);
                if (corpus.Fingerprint != trained.Run.DataFingerprint)
                    throw new ConfigException($"{corpus.Name} with validation fraction {validation.ToString(CultureInfo.InvariantCulture)} is not the data the run trained on " +
                                              "(its fingerprint differs): pass --data with the run's file, and --validation-fraction if it was not the default");
                var sampler = new BatchSampler(corpus, trained.Run.Seed, trained.Run.Model.Context);
                result = Evaluation.OnValidationSplit(trained.Model, sampler, trained.Run.TrainInt(nameof(TrainOptions.MicroBatch)),
                    trained.Run.TrainInt(nameof(TrainOptions.EvalBatches)), trained.Tokenizer);
                on = $"the run's validation split of {corpus.Name}";
            }
            if (p.GetValue(json))
                stdout.WriteLine(JsonSerializer.Serialize(new Dictionary<string, object>
                {
                    ["step"] = trained.Step, ["source"] = trained.Source, ["on"] = on, ["tokenizer"] = trained.Tokenizer.Name,
                    ["nats_per_token"] = result.NatsPerToken, ["nats_per_byte"] = result.NatsPerByte, ["bits_per_byte"] = result.BitsPerByte,
                    ["perplexity"] = result.Perplexity, ["tokens"] = result.Tokens, ["bytes"] = result.Bytes,
                }, new JsonSerializerOptions { Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping }));
            else
                stdout.WriteLine(string.Create(CultureInfo.InvariantCulture,
                    $"step {trained.Step} on {on}: {result.NatsPerToken:F6} nats/token, {result.NatsPerByte:F6} nats/byte ({result.BitsPerByte:F4} bits/byte), " +
                    $"perplexity {result.Perplexity:F3} over {result.Tokens:N0} tokens ({trained.Tokenizer.Name})"));
            return Program.ExitCodes.Ok;
        }));
        return cmd;
    }

    private static TrainedModel Load(string from, long? step, int threads, TextWriter stderr)
    {
        if (threads < 0) throw new ConfigException($"--threads must be zero (all cores) or positive, got {threads}");
        Native.LibTorchLoader.EnsureLoaded();
        TorchSharp.torch.set_num_threads(threads > 0 ? threads : Environment.ProcessorCount);
        TrainedModel trained;
        try
        {
            trained = TrainedModel.Open(from, step);
        }
        catch (ArgumentException e)
        {
            throw new ConfigException(e.Message);
        }
        foreach (var w in trained.Warnings) stderr.WriteLine($"warning: {w}");
        return trained;
    }

    private static void Check(Action validate)
    {
        try { validate(); }
        catch (ArgumentException e) { throw new ConfigException(e.Message); }
    }

    private static string ReadStdin(Func<TextReader?>? stdin)
    {
        if (stdin is not null) return stdin()?.ReadToEnd() ?? "";
        return Console.IsInputRedirected ? Console.In.ReadToEnd() : "";
    }
}
