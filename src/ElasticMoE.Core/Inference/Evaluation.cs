using ElasticMoE.Data;
using ElasticMoE.Model;
using static TorchSharp.torch;

namespace ElasticMoE.Inference;

/// <summary>A model's loss on some text.</summary>
/// <param name="NatsPerToken">Mean next-token cross-entropy.</param>
/// <param name="NatsPerByte">The same loss spread over the UTF-8 bytes of the predicted tokens: comparable across tokenizers.</param>
/// <param name="Tokens">Tokens predicted.</param>
public sealed record EvalResult(double NatsPerToken, double NatsPerByte, long Tokens, long Bytes)
{
    public double Perplexity => Math.Exp(NatsPerToken);
    public double BitsPerByte => NatsPerByte / Math.Log(2);
}

/// <summary>Validation losses of a trained model: on a run's own validation split, or on any text.</summary>
public static class Evaluation
{
    /// <summary>
    /// The validation loss exactly as training reports it (<see cref="Training.Trainer.Evaluate"/>): the run's
    /// <c>eval-batches</c> batches of <c>micro-batch</c> fixed validation sequences, the mean of the batches' mean
    /// losses, each batch's loss taken as a float as training takes it, so the figure is the training's to the bit.
    /// </summary>
    public static EvalResult OnValidationSplit(MoETransformer model, BatchSampler sampler, int microBatch, int evalBatches, ITokenizer tokenizer)
    {
        model.eval();
        double sum = 0;
        long tokens = 0, bytes = 0;
        using (no_grad())
        {
            for (int b = 0; b < evalBatches; b++)
            {
                using var scope = NewDisposeScope();
                var (x, y) = sampler.ValidationBatch(b * microBatch, microBatch);
                sum += MoETransformer.CrossEntropy(model.forward(x), y).item<float>();
                var targets = y.reshape(-1).data<long>().ToArray().Select(t => (int)t).ToArray();
                tokens += targets.Length;
                bytes += tokenizer.ByteCount(targets);
            }
        }
        model.TakeExpertCounts();
        double perToken = sum / evalBatches;
        return new EvalResult(perToken, perToken * tokens / bytes, tokens, bytes);
    }

    /// <summary>
    /// The loss on a whole text: its tokens cut into windows of the context (each window's first token is
    /// given, the rest predicted; consecutive windows overlap by that one token, so every token but the first
    /// is predicted exactly once), in batches of <paramref name="batch"/> windows.
    /// </summary>
    /// <exception cref="InvalidDataException">Fewer than two tokens: nothing to predict.</exception>
    public static EvalResult OnTokens(MoETransformer model, IReadOnlyList<int> tokens, ITokenizer tokenizer, int batch = 8)
    {
        if (tokens.Count < 2) throw new InvalidDataException($"the text has {tokens.Count} token(s): at least two are needed to predict one");
        int context = model.Options.Context;
        var windows = new List<(int From, int Length)>();
        for (int from = 0; from + 1 < tokens.Count; from += context)
            windows.Add((from, Math.Min(context, tokens.Count - 1 - from)));
        model.eval();
        double nats = 0;
        using (no_grad())
        {
            for (int w = 0; w < windows.Count; w += batch)
            {
                // Windows of one length per forward; only the last window can be shorter.
                foreach (var group in windows.Skip(w).Take(batch).GroupBy(x => x.Length))
                {
                    using var scope = NewDisposeScope();
                    int n = group.Count(), t = group.Key;
                    var x = new long[n * t];
                    var y = new long[n * t];
                    int row = 0;
                    foreach (var (from, _) in group)
                    {
                        for (int i = 0; i < t; i++)
                        {
                            x[row * t + i] = tokens[from + i];
                            y[row * t + i] = tokens[from + i + 1];
                        }
                        row++;
                    }
                    var logits = model.forward(tensor(x, [n, t]));
                    using var ce = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[^1]), tensor(y), reduction: nn.Reduction.Sum);
                    nats += ce.to(ScalarType.Float64).item<double>();
                }
            }
        }
        model.TakeExpertCounts();
        var predicted = tokens.Skip(1).ToArray();
        long bytes = tokenizer.ByteCount(predicted);
        return new EvalResult(nats / predicted.Length, nats / Math.Max(1, bytes), predicted.Length, bytes);
    }
}
