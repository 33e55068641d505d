using System.Buffers.Binary;
using System.IO.MemoryMappedFiles;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using System.Text.Json.Serialization;

namespace ElasticMoE.Data;

/// <summary>One shard of a prepared corpus, as its index lists it.</summary>
public sealed record ShardEntry(
    [property: JsonPropertyName("file")] string File,
    [property: JsonPropertyName("tokens")] long Tokens,
    [property: JsonPropertyName("sha256")] string Sha256);

/// <summary>
/// <c>index.json</c> of a directory written by <c>elasticmoe data prepare</c>: which tokenizer, how tokens are stored and
/// the shards in corpus order. Every shard but the last holds exactly <see cref="ShardTokens"/> tokens, so token i is in
/// shard i / ShardTokens without a search.
/// </summary>
public sealed record ShardIndex(
    [property: JsonPropertyName("format")] string Format,
    [property: JsonPropertyName("tokenizer")] string Tokenizer,
    [property: JsonPropertyName("vocab_size")] int VocabSize,
    [property: JsonPropertyName("token_bytes")] int TokenBytes,
    [property: JsonPropertyName("shard_tokens")] long ShardTokens,
    [property: JsonPropertyName("total_tokens")] long TotalTokens,
    [property: JsonPropertyName("source_bytes")] long SourceBytes,
    [property: JsonPropertyName("shards")] IReadOnlyList<ShardEntry> Shards)
{
    public const string FileName = "index.json";
    public const string CurrentFormat = "elasticmoe-token-shards/1";

    private static readonly JsonSerializerOptions Json = new() { WriteIndented = true };

    /// <summary>Bytes per stored token: uint16 when every id fits (a vocabulary of at most 65,536), else uint32.</summary>
    public static int TokenBytesFor(int vocabSize) => vocabSize <= 1 << 16 ? 2 : 4;

    public static bool Exists(string dir) => System.IO.File.Exists(Path.Combine(dir, FileName));

    /// <summary>Reads and checks the index of <paramref name="dir"/> (its own consistency, not yet the shards' bytes).</summary>
    /// <exception cref="InvalidDataException">Missing, unreadable or inconsistent, with the file named.</exception>
    public static ShardIndex Read(string dir)
    {
        var path = Path.Combine(dir, FileName);
        if (!System.IO.File.Exists(path))
            throw new FileNotFoundException($"{path}: no token shard index (write one with `elasticmoe data prepare --out {dir} FILES...`)", path);
        ShardIndex? index;
        try
        {
            index = JsonSerializer.Deserialize<ShardIndex>(System.IO.File.ReadAllText(path), Json);
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"{path}: not a token shard index ({e.Message})", e);
        }
        if (index is null || index.Format != CurrentFormat)
            throw new InvalidDataException($"{path}: not a token shard index of format {CurrentFormat} (got {index?.Format ?? "nothing"})");
        void Require(bool ok, string what)
        {
            if (!ok) throw new InvalidDataException($"{path}: {what}");
        }
        Require(index.Shards is { Count: > 0 }, "lists no shards");
        Require(index.TokenBytes == TokenBytesFor(index.VocabSize), $"token_bytes {index.TokenBytes} does not fit vocab_size {index.VocabSize}");
        Require(index.ShardTokens > 0, "shard_tokens must be positive");
        for (int i = 0; i < index.Shards.Count; i++)
        {
            var s = index.Shards[i];
            Require(s.File is { Length: > 0 } && Path.GetFileName(s.File) == s.File, $"shard {i}: file must be a plain file name, got \"{s.File}\"");
            Require(i == index.Shards.Count - 1 ? s.Tokens is > 0 && s.Tokens <= index.ShardTokens : s.Tokens == index.ShardTokens,
                $"{s.File}: {s.Tokens} tokens; every shard but the last must hold shard_tokens = {index.ShardTokens}");
            Require(s.Sha256 is { Length: 64 }, $"{s.File}: sha256 must be 64 hex digits");
        }
        Require(index.Shards.Sum(s => s.Tokens) == index.TotalTokens, $"total_tokens {index.TotalTokens} is not the sum of the shards'");
        return index;
    }

    public void Write(string dir)
    {
        // Written last, and atomically: a directory with an index is a finished preparation.
        var path = Path.Combine(dir, FileName);
        var tmp = path + ".tmp";
        System.IO.File.WriteAllText(tmp, JsonSerializer.Serialize(this, Json));
        System.IO.File.Move(tmp, path, overwrite: true);
    }

    /// <summary>
    /// SHA-256 (lower-case hex) of what identifies the tokens: tokenizer, storage width, shard size and each shard's token
    /// count and checksum in order. File names and source sizes are left out: the same tokens elsewhere are the same data.
    /// </summary>
    public string ContentHash()
    {
        var sb = new StringBuilder($"{CurrentFormat};tokenizer={Tokenizer};vocab={VocabSize};bytes={TokenBytes};shard={ShardTokens};");
        foreach (var s in Shards) sb.Append(s.Tokens).Append(':').Append(s.Sha256).Append(';');
        return Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(sb.ToString())));
    }
}

/// <summary>Figures of one <see cref="TokenShards.Prepare"/>.</summary>
public sealed record PrepareResult(ShardIndex Index, double Seconds)
{
    public double MegabytesPerSecond => Index.SourceBytes / 1e6 / Seconds;
    public double TokensPerSecond => Index.TotalTokens / Seconds;
}

/// <summary>Writing token shards from text files, and checking them.</summary>
public static class TokenShards
{
    /// <summary>Default tokens per shard: 2^26 (128 MiB of uint16): few files, each well under any file-size limit.</summary>
    public const long DefaultShardTokens = 1L << 26;

    /// <summary>Bytes of text read at a time; what is encoded in one call is at most about this much.</summary>
    public const int DefaultBlockBytes = 4 << 20;

    /// <summary>
    /// Tokenizes <paramref name="files"/>, as one concatenated text, into shards of <paramref name="shardTokens"/> tokens in
    /// <paramref name="outDir"/> and writes the index last. Memory stays at a few blocks whatever the files' sizes.
    /// <paramref name="progress"/> gets the source bytes read so far.
    /// </summary>
    /// <exception cref="InvalidDataException"><paramref name="outDir"/> already holds a prepared corpus.</exception>
    public static PrepareResult Prepare(ITokenizer tokenizer, string outDir, IReadOnlyList<string> files, long shardTokens = DefaultShardTokens,
        int blockBytes = DefaultBlockBytes, Action<long>? progress = null)
    {
        ArgumentNullException.ThrowIfNull(tokenizer);
        ArgumentNullException.ThrowIfNull(files);
        if (shardTokens <= 0) throw new ArgumentOutOfRangeException(nameof(shardTokens), "must be positive");
        if (files.Count == 0) throw new ArgumentException("no input files", nameof(files));
        foreach (var f in files)
            if (!File.Exists(f)) throw new FileNotFoundException($"data file not found: {f}", f);
        Directory.CreateDirectory(outDir);
        if (ShardIndex.Exists(outDir))
            throw new InvalidDataException($"{outDir} already holds a prepared corpus ({ShardIndex.FileName}); remove it or choose another --out");
        var clock = System.Diagnostics.Stopwatch.StartNew();
        int width = ShardIndex.TokenBytesFor(tokenizer.VocabSize);
        using var writer = new ShardWriter(outDir, width, shardTokens);
        long sourceBytes = StreamingEncoder.Encode(tokenizer, files, blockBytes, writer.Append, progress);
        var shards = writer.Finish();
        if (shards.Count == 0) throw new InvalidDataException($"{string.Join(", ", files)}: no tokens (empty input)");
        var index = new ShardIndex(ShardIndex.CurrentFormat, tokenizer.Name, tokenizer.VocabSize, width, shardTokens,
            shards.Sum(s => s.Tokens), sourceBytes, shards);
        index.Write(outDir);
        return new PrepareResult(index, clock.Elapsed.TotalSeconds);
    }

    /// <summary>
    /// Checks every shard of <paramref name="dir"/> against its index: size, then SHA-256 (read through a plain stream,
    /// not a mapping, so checking does not leave the corpus resident in this process). <paramref name="progress"/> gets
    /// the bytes checked so far.
    /// </summary>
    /// <exception cref="InvalidDataException">The first damaged or missing shard, by file name.</exception>
    public static ShardIndex Verify(string dir, Action<long>? progress = null)
    {
        var index = ShardIndex.Read(dir);
        long done = 0;
        foreach (var s in index.Shards)
        {
            var path = Path.Combine(dir, s.File);
            long expected = s.Tokens * index.TokenBytes;
            if (!File.Exists(path)) throw new InvalidDataException($"{path}: shard missing (listed in {ShardIndex.FileName})");
            long actual = new FileInfo(path).Length;
            if (actual != expected)
                throw new InvalidDataException($"{path}: {actual} bytes, the index says {expected} ({s.Tokens} tokens of {index.TokenBytes} bytes): the shard is damaged or truncated; prepare it again");
            using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 20, FileOptions.SequentialScan);
            using var sha = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
            var buffer = new byte[1 << 20];
            int n;
            while ((n = stream.Read(buffer, 0, buffer.Length)) > 0)
            {
                sha.AppendData(buffer, 0, n);
                done += n;
                progress?.Invoke(done);
            }
            var hash = Convert.ToHexStringLower(sha.GetHashAndReset());
            if (hash != s.Sha256)
                throw new InvalidDataException($"{path}: SHA-256 {hash} is not the index's {s.Sha256}: the shard is damaged; prepare it again");
        }
        return index;
    }

    public static string ShardFileName(int shard) => $"shard-{shard:D5}.bin";
}

/// <summary>
/// Encodes a sequence of files as one text, block by block, giving exactly the tokens of encoding the concatenation whole.
/// </summary>
/// <remarks>
/// The bytes tokenizer has no context: any border is right. A BPE (GPT-2, cl100k, o200k) first splits text into pieces
/// by a regular expression and merges only within a piece, so a border is safe where every one of those expressions
/// must end a piece, looking no further than one character ahead. Two such places are used:
/// <list type="bullet">
/// <item>right after a lone <c>\n</c> between two printable ASCII characters (<c>x\n|Y</c>): no piece runs from a newline
/// into a following non-space, and with non-space before it the newline is a piece ending there (or ends the
/// punctuation piece before it) whether or not the text goes on. Not after a run of whitespace (<c>\n\n</c>, <c>\r\n</c>,
/// <c>  \n</c>): GPT-2's <c>\s+(?!\S)</c> splits such a run by what follows it, so cutting it would change the pieces.</item>
/// <item>failing that, before a space between two ASCII letters (<c>a| b</c>): a letter run ends at a space in every
/// pattern, and the next piece (<c> b</c>...) starts there.</item>
/// </list>
/// Both borders are on ASCII bytes, so no UTF-8 sequence is ever cut. A block with neither border grows until one
/// comes (only a pathological text, megabytes without a newline or a word break, is held whole).
/// </remarks>
public static class StreamingEncoder
{
    /// <summary>Feeds the tokens of <paramref name="files"/> to <paramref name="sink"/> in order; returns the bytes read.</summary>
    public static long Encode(ITokenizer tokenizer, IReadOnlyList<string> files, int blockBytes, Action<ReadOnlySpan<int>> sink, Action<long>? progress = null)
    {
        if (blockBytes <= 0) throw new ArgumentOutOfRangeException(nameof(blockBytes));
        var buffer = new byte[blockBytes * 2];
        int held = 0;
        long read = 0;
        bool anyBorder = tokenizer is ByteTokenizer;
        foreach (var file in files)
        {
            using var stream = new FileStream(file, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 16, FileOptions.SequentialScan);
            while (true)
            {
                if (buffer.Length - held < blockBytes) Array.Resize(ref buffer, buffer.Length * 2);
                int n = stream.Read(buffer, held, blockBytes);
                if (n == 0) break;
                held += n;
                read += n;   // not inside progress?.Invoke(...): without a callback its argument is never evaluated
                progress?.Invoke(read);
                int cut = anyBorder ? held : LastSafeBorder(buffer.AsSpan(0, held));
                if (cut <= 0) continue;
                sink(tokenizer.Encode(buffer.AsSpan(0, cut)));
                Buffer.BlockCopy(buffer, cut, buffer, 0, held - cut);
                held -= cut;
            }
        }
        if (held > 0) sink(tokenizer.Encode(buffer.AsSpan(0, held)));
        return read;
    }

    /// <summary>The last position p in <paramref name="text"/> where encoding [0, p) and [p, ...) apart equals encoding them together (0 if none).</summary>
    public static int LastSafeBorder(ReadOnlySpan<byte> text)
    {
        static bool Printable(byte b) => b is > 0x20 and < 0x7F;
        static bool Letter(byte b) => (uint)((b | 0x20) - 'a') <= 'z' - 'a';
        for (int p = text.Length - 1; p >= 2; p--)
            if (text[p - 1] == (byte)'\n' && Printable(text[p - 2]) && Printable(text[p])) return p;
        for (int p = text.Length - 2; p >= 1; p--)
            if (text[p] == (byte)' ' && Letter(text[p - 1]) && Letter(text[p + 1])) return p;
        return 0;
    }
}

/// <summary>Appends tokens to numbered shard files of a fixed size, hashing as it writes.</summary>
internal sealed class ShardWriter(string dir, int width, long shardTokens) : IDisposable
{
    private readonly List<ShardEntry> _done = [];
    private readonly byte[] _buffer = new byte[1 << 16];
    private FileStream? _file;
    private IncrementalHash? _sha;
    private long _inShard;

    public void Append(ReadOnlySpan<int> tokens)
    {
        while (tokens.Length > 0)
        {
            if (_file is null)
            {
                _file = new FileStream(Path.Combine(dir, TokenShards.ShardFileName(_done.Count)), FileMode.Create, FileAccess.Write, FileShare.None, 1 << 20);
                _sha = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
                _inShard = 0;
            }
            int take = (int)Math.Min(Math.Min(tokens.Length, _buffer.Length / width), shardTokens - _inShard);
            for (int i = 0; i < take; i++)
            {
                // Little-endian on disk whatever the machine, so shards move between hosts.
                if (width == 2) BinaryPrimitives.WriteUInt16LittleEndian(_buffer.AsSpan(i * 2), checked((ushort)tokens[i]));
                else BinaryPrimitives.WriteUInt32LittleEndian(_buffer.AsSpan(i * 4), checked((uint)tokens[i]));
            }
            _file.Write(_buffer, 0, take * width);
            _sha!.AppendData(_buffer, 0, take * width);
            _inShard += take;
            tokens = tokens[take..];
            if (_inShard == shardTokens) Close();
        }
    }

    private void Close()
    {
        if (_file is null) return;
        var name = Path.GetFileName(_file.Name);
        _file.Flush(flushToDisk: true);
        _file.Dispose();
        _done.Add(new ShardEntry(name, _inShard, Convert.ToHexStringLower(_sha!.GetHashAndReset())));
        _sha.Dispose();
        (_file, _sha) = (null, null);
    }

    public IReadOnlyList<ShardEntry> Finish()
    {
        Close();
        return _done;
    }

    public void Dispose()
    {
        _file?.Dispose();
        _sha?.Dispose();
    }
}

/// <summary>
/// The tokens of a prepared corpus, memory-mapped read-only: token i is read from the page cache on demand, so a corpus
/// larger than memory costs only the pages recently touched (file-backed, which the kernel drops under pressure), never
/// a copy on the heap.
/// </summary>
public sealed unsafe class MappedTokens : IDisposable
{
    private readonly MemoryMappedFile[] _files;
    private readonly MemoryMappedViewAccessor[] _views;
    private readonly byte*[] _starts;
    private readonly long _shardTokens;
    private readonly bool _wide;

    public ShardIndex Index { get; }
    public string Directory { get; }
    public long Count => Index.TotalTokens;

    private MappedTokens(string dir, ShardIndex index)
    {
        Directory = dir;
        Index = index;
        _shardTokens = index.ShardTokens;
        _wide = index.TokenBytes == 4;
        int n = index.Shards.Count;
        (_files, _views, _starts) = (new MemoryMappedFile[n], new MemoryMappedViewAccessor[n], new byte*[n]);
        try
        {
            for (int i = 0; i < n; i++)
            {
                long bytes = index.Shards[i].Tokens * index.TokenBytes;
                _files[i] = MemoryMappedFile.CreateFromFile(Path.Combine(dir, index.Shards[i].File), FileMode.Open, null, 0, MemoryMappedFileAccess.Read);
                _views[i] = _files[i].CreateViewAccessor(0, bytes, MemoryMappedFileAccess.Read);
                byte* p = null;
                _views[i].SafeMemoryMappedViewHandle.AcquirePointer(ref p);
                _starts[i] = p + _views[i].PointerOffset;
            }
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    /// <summary>Opens <paramref name="dir"/>: the index, then every shard checked by size and SHA-256 before it is mapped.</summary>
    /// <exception cref="InvalidDataException">A damaged index or shard, by file name.</exception>
    public static MappedTokens Open(string dir) => new(dir, TokenShards.Verify(dir));

    /// <summary>Reads between two drops of the resident pages (see <see cref="DropResidentPages"/>): about 0.1 GiB resident at most here.</summary>
    public const int DropEveryReads = 1 << 17;

    private const int MadvDontNeed = 4;
    private int _reads;

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "madvise", SetLastError = true)]
    private static extern int Madvise(nint address, nuint length, int advice);

    /// <summary>Pages of the shards this process has resident (counted in its RssFile) are unmapped from it.</summary>
    /// <remarks>
    /// Why: a read fault maps not one page but the whole page-cache folio around it (here about 1 KiB per token read,
    /// ~0.5 MiB per sequence), so random sequences over a large corpus grow the process's RssFile towards the corpus
    /// size. Those pages are clean and the kernel could drop them, but a resident set that grows with the run reads as a
    /// leak. madvise(MADV_DONTNEED) on a read-only file mapping only unmaps: the pages stay in the page cache and the
    /// next read maps them again (a minor fault), with the same bytes, so it is safe while other threads read.
    /// Every <see cref="DropEveryReads"/> reads; Linux only (elsewhere the kernel's own reclaim is left to it).
    /// </remarks>
    public void DropResidentPages()
    {
        _reads = 0;
        if (!OperatingSystem.IsLinux()) return;
        for (int i = 0; i < _starts.Length; i++)
            if (_starts[i] != null) Madvise((nint)(_starts[i] - _views[i].PointerOffset), (nuint)(_views[i].Capacity + _views[i].PointerOffset), MadvDontNeed);
    }

    public int this[long i]
    {
        get
        {
            if ((ulong)i >= (ulong)Index.TotalTokens) throw new ArgumentOutOfRangeException(nameof(i), i, $"token index outside 0..{Index.TotalTokens - 1}");
            // Not atomic on purpose: a count lost to a race only delays a drop, and the tokens read are the same either way.
            if (++_reads >= DropEveryReads) DropResidentPages();
            long shard = i / _shardTokens, at = i - shard * _shardTokens;
            byte* p = _starts[shard];
            return _wide ? (int)BinaryPrimitives.ReadUInt32LittleEndian(new ReadOnlySpan<byte>(p + at * 4, 4))
                         : BinaryPrimitives.ReadUInt16LittleEndian(new ReadOnlySpan<byte>(p + at * 2, 2));
        }
    }

    public void Dispose()
    {
        for (int i = 0; i < _views.Length; i++)
        {
            if (_views[i] is { } v)
            {
                if (_starts[i] != null) v.SafeMemoryMappedViewHandle.ReleasePointer();
                v.Dispose();
            }
            _files[i]?.Dispose();
            _starts[i] = null;
        }
    }
}
