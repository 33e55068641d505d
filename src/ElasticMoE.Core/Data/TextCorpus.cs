using System.Buffers.Binary;
using System.Security.Cryptography;
using System.Text;

namespace ElasticMoE.Data;

/// <summary>A byte-level corpus split into a training head and a validation tail.</summary>
public sealed class TextCorpus
{
    private readonly Lazy<string> _fingerprint;

    public string Name { get; }
    public byte[] Train { get; }
    public byte[] Validation { get; }

    /// <summary>
    /// SHA-256, lower-case hex, of the training bytes and the validation bytes, each preceded by its length:
    /// equal exactly when both the corpus and where it is split are equal.
    /// </summary>
    /// <remarks>
    /// Why: nodes of one run each load the corpus themselves, and a node with another file, another copy
    /// of it or another validation fraction would train on different batches without any error, only a
    /// different curve. The fingerprint goes into <c>TrainingState.RunFingerprint</c>, which a node sends
    /// when it registers. The name is left out on purpose: the same bytes under another file name are the
    /// same data. Computed on first use and kept (the arrays are not expected to change after loading).
    /// </remarks>
    public string Fingerprint => _fingerprint.Value;

    private TextCorpus(string name, byte[] all, double validationFraction, int context)
    {
        int valLen = (int)(all.Length * validationFraction);
        if (all.Length - valLen <= context + 1 || valLen <= context + 1)
            throw new InvalidDataException(
                $"{name}: {all.Length} bytes is too small for a context of {context} with a validation fraction of {validationFraction}");
        Name = name;
        Train = all[..^valLen];
        Validation = all[^valLen..];
        _fingerprint = new Lazy<string>(ComputeFingerprint);
    }

    private string ComputeFingerprint()
    {
        using var sha = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        Span<byte> length = stackalloc byte[sizeof(long)];
        foreach (var part in new[] { Train, Validation })
        {
            // The length makes the split point part of the hash: moving it changes the fingerprint even
            // though the concatenated bytes stay the same.
            BinaryPrimitives.WriteInt64LittleEndian(length, part.LongLength);
            sha.AppendData(length);
            sha.AppendData(part);
        }
        return Convert.ToHexStringLower(sha.GetHashAndReset());
    }

    /// <summary>Any text (or binary) file: bytes are tokens.</summary>
    public static TextCorpus FromFile(string path, double validationFraction, int context)
    {
        if (!File.Exists(path))
            throw new FileNotFoundException($"data file not found: {path}", path);
        return new TextCorpus(Path.GetFileName(path), File.ReadAllBytes(path), validationFraction, context);
    }

    /// <summary>The embedded default: generated, identical on every machine, no download.</summary>
    public static TextCorpus Default(double validationFraction, int context)
        => new("embedded-default", DefaultCorpus.Generate(), validationFraction, context);

    public static TextCorpus Load(string? path, double validationFraction, int context)
        => string.IsNullOrEmpty(path) ? Default(validationFraction, context) : FromFile(path, validationFraction, context);

    public static TextCorpus FromBytes(string name, byte[] bytes, double validationFraction, int context)
        => new(name, bytes, validationFraction, context);

    public static TextCorpus FromText(string name, string text, double validationFraction, int context)
        => new(name, Encoding.UTF8.GetBytes(text), validationFraction, context);
}

/// <summary>
/// Generates the embedded default corpus: about 600 kB of English-like text from a small grammar,
/// arithmetic facts and a ledger. It has structure at several scales (spelling, agreement, sums, line
/// formats), so a small model on two cores visibly learns it within minutes.
/// </summary>
public static class DefaultCorpus
{
    private static readonly string[] Names = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar", "peggy", "trent", "victor", "wendy"];
    private static readonly string[] Animals = ["fox", "dog", "cat", "owl", "horse", "mouse", "whale", "eagle", "otter", "badger", "rabbit", "wolf"];
    private static readonly string[] Adjectives = ["quick", "lazy", "red", "small", "old", "quiet", "bright", "brave", "clever", "gentle", "wild", "sleepy"];
    private static readonly string[] Verbs = ["sees", "follows", "helps", "finds", "meets", "watches", "calls", "greets"];
    private static readonly string[] Places = ["the river", "the old mill", "the forest", "the market", "the hill", "the harbour", "the garden", "the bridge"];
    private static readonly string[] Times = ["at dawn", "at noon", "in the evening", "at night", "in the morning", "after the rain"];
    private static readonly string[] Items = ["apples", "candles", "ropes", "lanterns", "books", "coins", "loaves", "shells"];

    public static byte[] Generate(int targetBytes = 600_000)
    {
        var rng = new SplitMix64(0xE1A571C0UL);
        var sb = new StringBuilder(targetBytes + 256);
        string Pick(string[] a) => a[rng.NextInt(a.Length)];
        while (sb.Length < targetBytes)
        {
            switch (rng.NextInt(6))
            {
                case 0:
                case 1:
                    sb.Append($"the {Pick(Adjectives)} {Pick(Animals)} {Pick(Verbs)} the {Pick(Adjectives)} {Pick(Animals)} near {Pick(Places)} {Pick(Times)}.\n");
                    break;
                case 2:
                {
                    int a = rng.NextInt(100), b = rng.NextInt(100);
                    sb.Append($"{a} + {b} = {a + b}.\n");
                    break;
                }
                case 3:
                {
                    var who = Pick(Names);
                    int n = 1 + rng.NextInt(9);
                    var item = Pick(Items);
                    sb.Append($"{who} buys {n} {item} at {Pick(Places)}. {who} now has {n} {item}.\n");
                    break;
                }
                case 4:
                {
                    var a = Pick(Names);
                    var b = Pick(Names);
                    sb.Append($"{a}: hello {b}, have you seen the {Pick(Animals)}?\n{b}: yes {a}, it went to {Pick(Places)} {Pick(Times)}.\n");
                    break;
                }
                default:
                {
                    int x = rng.NextInt(13), y = rng.NextInt(13);
                    sb.Append($"{x} times {y} is {x * y}.\n");
                    break;
                }
            }
        }
        return Encoding.ASCII.GetBytes(sb.ToString());
    }
}
