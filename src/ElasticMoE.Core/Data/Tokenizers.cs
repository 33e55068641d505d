using System.Text;

namespace ElasticMoE.Data;

/// <summary>Text to token ids and back.</summary>
public interface ITokenizer
{
    /// <summary>The name in <c>data.tokenizer</c>.</summary>
    string Name { get; }

    /// <summary>Token ids are 0 … VocabSize − 1: the model's vocabulary follows it.</summary>
    int VocabSize { get; }

    int[] Encode(string text);

    /// <summary>The tokens of a UTF-8 byte sequence (a file's contents).</summary>
    int[] Encode(ReadOnlySpan<byte> utf8);

    string Decode(IReadOnlyList<int> tokens);

    /// <summary>UTF-8 bytes of the text of <paramref name="tokens"/>: what per-byte figures divide by.</summary>
    long ByteCount(IReadOnlyList<int> tokens);
}

/// <summary>One token per byte: the model's original vocabulary of 256.</summary>
public sealed class ByteTokenizer : ITokenizer
{
    public static readonly ByteTokenizer Instance = new();

    public string Name => "bytes";
    public int VocabSize => 256;

    public int[] Encode(string text) => Encode(Encoding.UTF8.GetBytes(text));

    public int[] Encode(ReadOnlySpan<byte> utf8)
    {
        var ids = new int[utf8.Length];
        for (int i = 0; i < ids.Length; i++) ids[i] = utf8[i];
        return ids;
    }

    public string Decode(IReadOnlyList<int> tokens)
    {
        var bytes = new byte[tokens.Count];
        for (int i = 0; i < bytes.Length; i++) bytes[i] = checked((byte)tokens[i]);
        return Encoding.UTF8.GetString(bytes);
    }

    public long ByteCount(IReadOnlyList<int> tokens) => tokens.Count;
}

/// <summary>The tokenizers <c>data.tokenizer</c> can name.</summary>
public static class Tokenizers
{
    public static IReadOnlyList<string> Names { get; } = ["bytes"];

    /// <summary>The tokenizer a model was trained with.</summary>
    public static string NameOf(Configuration.ModelOptions model) => "bytes";

    /// <exception cref="ArgumentException">Not a known tokenizer.</exception>
    public static ITokenizer For(string name) => name switch
    {
        "bytes" => ByteTokenizer.Instance,
        _ => throw new ArgumentException($"unknown tokenizer \"{name}\" (one of {string.Join(", ", Names.Select(n => $"\"{n}\""))})"),
    };
}
