using System.Buffers.Binary;
using System.Runtime.InteropServices;
using System.Security.Cryptography;
using System.Text;

namespace ElasticMoE.Data;

/// <summary>A corpus as tokens, split into a training head and a validation tail.</summary>
/// <remarks>
/// Byte-level (the default tokenizer) keeps the bytes themselves: they are the tokens, one byte each, and
/// nothing is converted. Another tokenizer encodes the whole text once when the corpus is loaded and keeps the
/// token ids; the split is then by tokens. A directory of token shards (<c>elasticmoe data prepare</c>) is memory-mapped
/// instead: nothing is read into memory, and the split is by tokens of the whole prepared corpus, as for a file.
/// </remarks>
public sealed class TextCorpus : IDisposable
{
    private readonly Lazy<string> _fingerprint;
    private readonly int[]? _trainTokens, _validationTokens;
    private readonly MappedTokens? _mapped;
    private readonly long _mappedTrain;

    public string Name { get; }

    /// <summary>The tokenizer the tokens are of.</summary>
    public ITokenizer Tokenizer { get; }

    /// <summary>The training bytes of a byte-level corpus (empty for another tokenizer: see <see cref="TrainToken"/>).</summary>
    public byte[] Train { get; }

    /// <summary>The validation bytes of a byte-level corpus (empty for another tokenizer).</summary>
    public byte[] Validation { get; }

    /// <summary>Tokens in the training head.</summary>
    public long TrainLength => _mapped is not null ? _mappedTrain : _trainTokens?.Length ?? Train.Length;

    /// <summary>Tokens in the validation tail.</summary>
    public long ValidationLength => _mapped is { } m ? m.Count - _mappedTrain : _validationTokens?.Length ?? Validation.Length;

    /// <summary>Training token <paramref name="i"/>.</summary>
    public int TrainToken(long i) => _mapped is { } m ? m[i] : _trainTokens is { } t ? t[i] : Train[i];

    /// <summary>Validation token <paramref name="i"/>.</summary>
    public int ValidationToken(long i) => _mapped is { } m ? m[_mappedTrain + i] : _validationTokens is { } t ? t[i] : Validation[i];

    /// <summary>The shards' directory when this corpus is memory-mapped token shards (null otherwise).</summary>
    public string? ShardDirectory => _mapped?.Directory;

    /// <summary>
    /// SHA-256, lower-case hex, of the training tokens and the validation tokens, each preceded by its length:
    /// equal exactly when both the corpus and where it is split are equal. Of the bytes themselves for a
    /// byte-level corpus; of the tokenizer's name and the token ids (int32, little-endian) for another.
    /// </summary>
    /// <remarks>
    /// Why: nodes of one run each load the corpus themselves, and a node with another file, another copy
    /// of it or another validation fraction would train on different batches without any error, only a
    /// different curve. The fingerprint goes into <c>TrainingState.RunFingerprint</c>, which a node sends
    /// when it registers. The name is left out on purpose: the same bytes under another file name are the
    /// same data. Computed on first use and kept (the arrays are not expected to change after loading).
    /// </remarks>
    public string Fingerprint => _fingerprint.Value;

    private TextCorpus(string name, byte[] all, double validationFraction, int context, ITokenizer? tokenizer = null)
    {
        Tokenizer = tokenizer ?? ByteTokenizer.Instance;
        Name = name;
        if (Tokenizer is ByteTokenizer)
        {
            int valLen = CheckedSplit(name, all.Length, validationFraction, context, "bytes");
            Train = all[..^valLen];
            Validation = all[^valLen..];
        }
        else
        {
            var tokens = Tokenizer.Encode(all);
            int valLen = CheckedSplit(name, tokens.Length, validationFraction, context, $"{Tokenizer.Name} tokens");
            _trainTokens = tokens[..^valLen];
            _validationTokens = tokens[^valLen..];
            Train = Validation = [];
        }
        _fingerprint = new Lazy<string>(ComputeFingerprint);
    }

    private TextCorpus(string name, MappedTokens mapped, double validationFraction, int context, ITokenizer tokenizer)
    {
        Name = name;
        Tokenizer = tokenizer;
        _mapped = mapped;
        // The same split as a file's: the tail (long)(total x fraction) tokens validate.
        _mappedTrain = mapped.Count - CheckedSplit(name, mapped.Count, validationFraction, context, $"{tokenizer.Name} tokens");
        Train = Validation = [];
        _fingerprint = new Lazy<string>(ComputeFingerprint);
    }

    private static int CheckedSplit(string name, int length, double validationFraction, int context, string unit)
        => checked((int)CheckedSplit(name, (long)length, validationFraction, context, unit));

    private static long CheckedSplit(string name, long length, double validationFraction, int context, string unit)
    {
        long valLen = (long)(length * validationFraction);
        if (length - valLen <= context + 1 || valLen <= context + 1)
            throw new InvalidDataException(
                $"{name}: {length} {unit} is too small for a context of {context} with a validation fraction of {validationFraction}");
        return valLen;
    }

    private string ComputeFingerprint()
    {
        using var sha = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        if (_mapped is not null)
        {
            // Shards: of the index's content hash (tokenizer, each shard's token count and SHA-256, checked at open)
            // and the split, not of the tokens again: a multi-GiB corpus would cost a second full pass at every start.
            // So it differs from the fingerprint of the same text loaded from a file, on purpose: the two are read
            // differently, and a run keeps to one of them.
            sha.AppendData(Encoding.UTF8.GetBytes($"shards={_mapped.Index.ContentHash()};train={_mappedTrain};validation={ValidationLength}"));
            return Convert.ToHexStringLower(sha.GetHashAndReset());
        }
        Span<byte> length = stackalloc byte[sizeof(long)];
        if (_trainTokens is not null) sha.AppendData(Encoding.UTF8.GetBytes("tokenizer=" + Tokenizer.Name + ";"));
        foreach (var part in _trainTokens is null ? [Train, Validation] : new[] { MemoryMarshal.AsBytes(_trainTokens.AsSpan()).ToArray(), MemoryMarshal.AsBytes(_validationTokens.AsSpan()).ToArray() })
        {
            // The length makes the split point part of the hash: moving it changes the fingerprint even
            // though the concatenated bytes stay the same.
            BinaryPrimitives.WriteInt64LittleEndian(length, part.LongLength);
            sha.AppendData(length);
            sha.AppendData(part);
        }
        return Convert.ToHexStringLower(sha.GetHashAndReset());
    }

    /// <summary>Any text (or binary) file: bytes are tokens, or the text is encoded by <paramref name="tokenizer"/>.</summary>
    public static TextCorpus FromFile(string path, double validationFraction, int context, ITokenizer? tokenizer = null)
    {
        if (!File.Exists(path))
            throw new FileNotFoundException($"data file not found: {path}", path);
        return new TextCorpus(Path.GetFileName(path), File.ReadAllBytes(path), validationFraction, context, tokenizer);
    }

    /// <summary>The embedded default: generated, identical on every machine, no download.</summary>
    public static TextCorpus Default(double validationFraction, int context, ITokenizer? tokenizer = null)
        => new("embedded-default", DefaultCorpus.Generate(), validationFraction, context, tokenizer);

    /// <summary>The embedded corpus (no path), a directory of token shards, or a text file.</summary>
    public static TextCorpus Load(string? path, double validationFraction, int context, ITokenizer? tokenizer = null)
        => string.IsNullOrEmpty(path) ? Default(validationFraction, context, tokenizer)
            : Directory.Exists(path) ? FromShards(path, validationFraction, context, tokenizer)
            : FromFile(path, validationFraction, context, tokenizer);

    /// <summary>
    /// A directory written by <c>elasticmoe data prepare</c>, memory-mapped after every shard's SHA-256 is checked. The
    /// tokenizer the shards were prepared with must be <paramref name="tokenizer"/> (the run's <c>data.tokenizer</c>).
    /// </summary>
    /// <exception cref="InvalidDataException">Another tokenizer, or a damaged index or shard (named).</exception>
    public static TextCorpus FromShards(string dir, double validationFraction, int context, ITokenizer? tokenizer = null)
    {
        tokenizer ??= ByteTokenizer.Instance;
        var index = ShardIndex.Read(dir);
        if (index.Tokenizer != tokenizer.Name || index.VocabSize != tokenizer.VocabSize)
            throw new InvalidDataException(
                $"{Path.Combine(dir, ShardIndex.FileName)}: the shards are {index.Tokenizer} tokens (vocabulary {index.VocabSize}), but the run's data.tokenizer is " +
                $"{tokenizer.Name} (vocabulary {tokenizer.VocabSize}): set data.tokenizer = \"{index.Tokenizer}\" or prepare the text again with --tokenizer {tokenizer.Name}");
        var mapped = MappedTokens.Open(dir);
        try
        {
            return new TextCorpus(Path.GetFileName(Path.TrimEndingDirectorySeparator(Path.GetFullPath(dir))), mapped, validationFraction, context, tokenizer);
        }
        catch
        {
            mapped.Dispose();
            throw;
        }
    }

    /// <summary>Unmaps the shards of a shard corpus (nothing to do for one in memory).</summary>
    public void Dispose() => _mapped?.Dispose();

    /// <summary>The corpus a run of <paramref name="config"/> trains on: its data file (or the embedded one) in its tokenizer.</summary>
    public static TextCorpus Load(Configuration.ElasticMoEConfig config)
    {
        ArgumentNullException.ThrowIfNull(config);
        return Load(config.Data.Path, config.Data.ValidationFraction, config.Model.Context, Tokenizers.For(config.Model.Tokenizer));
    }

    public static TextCorpus FromBytes(string name, byte[] bytes, double validationFraction, int context, ITokenizer? tokenizer = null)
        => new(name, bytes, validationFraction, context, tokenizer);

    public static TextCorpus FromText(string name, string text, double validationFraction, int context, ITokenizer? tokenizer = null)
        => new(name, Encoding.UTF8.GetBytes(text), validationFraction, context, tokenizer);
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

    /// <summary>The text; another <paramref name="seed"/> gives other text of the same grammar (the embedded corpus is the default seed's).</summary>
    public static byte[] Generate(int targetBytes = 600_000, ulong seed = 0xE1A571C0UL)
    {
        var rng = new SplitMix64(seed);
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
