using System.Diagnostics;
using ElasticMoE.Model;
using static TorchSharp.torch;

namespace ElasticMoE.Inference;

/// <summary>What a generation did.</summary>
/// <param name="Tokens">The tokens generated (the prompt not included).</param>
/// <param name="Seconds">Wall time from the first forward to the last token, the prompt's forward included.</param>
public sealed record GenerationResult(IReadOnlyList<int> Tokens, int PromptTokens, double Seconds, bool KvCache)
{
    public double TokensPerSecond => Seconds > 0 ? Tokens.Count / Seconds : 0;
}

/// <summary>Autoregressive generation: the next token from the logits of the last position, again and again.</summary>
public static class TextGeneration
{
    /// <param name="prompt">At least one token (an empty prompt is the tokenizer's "\n": a text has to start somewhere).</param>
    /// <param name="kvCache">Keep every layer's keys and values (one new row through the model per token) or run the whole window every token.</param>
    /// <param name="onToken">Called with each token as soon as it is drawn (streaming).</param>
    /// <param name="onLogits">Tests: the logits of each step, as the sampler saw them.</param>
    public static GenerationResult Run(MoETransformer model, IReadOnlyList<int> prompt, int maxTokens, SamplingOptions sampling, bool kvCache,
        Action<int>? onToken = null, Action<float[]>? onLogits = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(prompt);
        if (prompt.Count == 0) throw new ArgumentException("the prompt needs at least one token", nameof(prompt));
        ArgumentOutOfRangeException.ThrowIfNegative(maxTokens);
        sampling.Validate();
        var sampler = new TokenSampler(sampling);
        int context = model.Options.Context;
        var text = new List<int>(prompt);
        var generated = new List<int>(maxTokens);
        model.eval();
        using var _ = no_grad();
        using var cache = kvCache ? model.NewKvCache() : null;
        int start = 0, cached = 0;
        var clock = Stopwatch.StartNew();
        for (int n = 0; n < maxTokens; n++)
        {
            int next = ContextWindow.Start(start, text.Count, context);
            if (next != start)
            {
                // The window jumped: the cached keys sit at positions of the old window.
                cache?.Clear();
                (start, cached) = (next, next);
            }
            float[] logits;
            using (var scope = NewDisposeScope())
            {
                int from = cache is null ? start : cached;
                var ids = new long[text.Count - from];
                for (int i = 0; i < ids.Length; i++) ids[i] = text[from + i];
                var input = tensor(ids, [1, ids.Length]);
                var output = cache is null ? model.forward(input) : model.ForwardCached(input, cache);
                logits = output.select(0, 0).select(0, ids.Length - 1).to(ScalarType.Float32).cpu().data<float>().ToArray();
            }
            cached = text.Count;
            onLogits?.Invoke(logits);
            int token = sampler.Next(logits);
            text.Add(token);
            generated.Add(token);
            onToken?.Invoke(token);
        }
        // Inference must not count towards any balancing loads.
        model.TakeExpertCounts();
        return new GenerationResult(generated, prompt.Count, clock.Elapsed.TotalSeconds, kvCache);
    }
}
