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

/// <summary>
/// A byte-level BPE tokenizer of Microsoft.ML.Tokenizers (GPT-2's, cl100k_base, o200k_base), its vocabulary read
/// from the Microsoft.ML.Tokenizers.Data.* package it ships in: nothing is downloaded at run time.
/// </summary>
public sealed class BpeTokenizer : ITokenizer
{
    private readonly Microsoft.ML.Tokenizers.TiktokenTokenizer _bpe;

    internal BpeTokenizer(string name, Microsoft.ML.Tokenizers.TiktokenTokenizer bpe, int vocabSize)
    {
        Name = name;
        _bpe = bpe;
        VocabSize = vocabSize;
    }

    public string Name { get; }
    public int VocabSize { get; }

    public int[] Encode(string text) => [.. _bpe.EncodeToIds(text)];

    public int[] Encode(ReadOnlySpan<byte> utf8) => Encode(Encoding.UTF8.GetString(utf8));

    public string Decode(IReadOnlyList<int> tokens) => _bpe.Decode(tokens);

    /// <summary>The UTF-8 bytes of the tokens' text, decoded whole (a token may hold part of a character).</summary>
    public long ByteCount(IReadOnlyList<int> tokens) => Encoding.UTF8.GetByteCount(Decode(tokens));
}

/// <summary>The tokenizers <c>data.tokenizer</c> can name.</summary>
public static class Tokenizers
{
    public static IReadOnlyList<string> Names { get; } = ["bytes", "gpt2", "cl100k", "o200k"];

    // The vocabulary sizes are the encodings' own (the highest id, a special token, + 1): the library keeps its tables
    // internal; a test checks each against the largest id the tokenizer decodes.
    // Loading a vocabulary takes a few hundred milliseconds and tens of MB: once per process, and only when asked for.
    private static readonly Lazy<BpeTokenizer> Gpt2 = new(() => new("gpt2", Microsoft.ML.Tokenizers.TiktokenTokenizer.CreateForModel("gpt2"), VocabSizeOf("gpt2")));
    private static readonly Lazy<BpeTokenizer> Cl100k = new(() => new("cl100k", Microsoft.ML.Tokenizers.TiktokenTokenizer.CreateForEncoding("cl100k_base"), VocabSizeOf("cl100k")));
    private static readonly Lazy<BpeTokenizer> O200k = new(() => new("o200k", Microsoft.ML.Tokenizers.TiktokenTokenizer.CreateForEncoding("o200k_base"), VocabSizeOf("o200k")));

    /// <summary>The vocabulary size of the tokenizer <paramref name="name"/>, without loading its vocabulary (reading a config must stay cheap).</summary>
    /// <exception cref="ArgumentException">Not a known tokenizer.</exception>
    public static int VocabSizeOf(string name) => name switch
    {
        "bytes" => 256,
        "gpt2" => 50257,
        "cl100k" => 100277,
        "o200k" => 200019,
        _ => For(name).VocabSize,
    };

    /// <summary>The tokenizer a model was trained with.</summary>
    public static string NameOf(Configuration.ModelOptions model) => model.Tokenizer;

    /// <exception cref="ArgumentException">Not a known tokenizer.</exception>
    public static ITokenizer For(string name) => name switch
    {
        "bytes" => ByteTokenizer.Instance,
        "gpt2" => Gpt2.Value,
        "cl100k" => Cl100k.Value,
        "o200k" => O200k.Value,
        _ => throw new ArgumentException($"unknown tokenizer \"{name}\" (one of {string.Join(", ", Names.Select(n => $"\"{n}\""))})"),
    };
}
