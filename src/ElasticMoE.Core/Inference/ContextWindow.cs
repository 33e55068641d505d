namespace ElasticMoE.Inference;

/// <summary>
/// Which tokens of a growing text the model sees when it predicts the next one: those from a window start to
/// the end, at most the context. When the text outgrows the window, the window jumps forward to keep the last
/// half context.
/// </summary>
/// <remarks>
/// Why jump by half a context rather than slide by one token: the KV cache holds keys at absolute RoPE
/// positions, so a window that slides by one would have to recompute the whole cache every token, which is
/// the cost the cache exists to avoid. Jumping refills it once per half context. The path without a cache uses
/// the same rule, so both see the same tokens and give the same text.
/// </remarks>
public static class ContextWindow
{
    /// <param name="start">The window's start so far.</param>
    /// <param name="length">Tokens in the text now.</param>
    /// <param name="context">The model's context.</param>
    public static int Start(int start, int length, int context)
        => length - start > context ? length - Math.Max(1, context / 2) : start;
}
