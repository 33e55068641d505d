using ElasticMoE.Data;

namespace ElasticMoE.Inference;

/// <summary>
/// Turns generated tokens into text as they come: each call returns the text that became certain with this token.
/// </summary>
/// <remarks>
/// A token may end in the middle of a UTF-8 character (a byte of a multi-byte character, or a BPE token that
/// holds half of one), which decodes as U+FFFD until the next token completes it. So the text is decoded
/// whole every time and a trailing U+FFFD is held back until more tokens come or <see cref="Flush"/> is called:
/// the printed text is then exactly the decoding of all tokens, however it was cut.
/// </remarks>
public sealed class TextStream(ITokenizer tokenizer)
{
    private readonly List<int> _tokens = [];
    private int _emitted;

    /// <summary>The text that follows what was returned before, now that <paramref name="token"/> came.</summary>
    public string Push(int token)
    {
        _tokens.Add(token);
        var text = tokenizer.Decode(_tokens);
        int end = text.Length;
        while (end > _emitted && text[end - 1] == '\uFFFD') end--;
        return Take(text, end);
    }

    /// <summary>Whatever is held back (an incomplete character at the end, printed as U+FFFD).</summary>
    public string Flush()
    {
        var text = tokenizer.Decode(_tokens);
        return Take(text, text.Length);
    }

    private string Take(string text, int end)
    {
        // The prefix already returned never changes: only a trailing incomplete character can, and it was held back.
        if (end <= _emitted) return "";
        var s = text[_emitted..end];
        _emitted = end;
        return s;
    }
}
