using System.Text;
using ElasticMoE.Data;
using ElasticMoE.Runtime.Hosting;
using ElasticMoE.Training;

namespace ElasticMoE.Tests.Data;

public class TokenShardTests
{
    // Borders a BPE must not be cut at: runs of whitespace and newlines, CRLF, digits, contractions, non-ASCII, a special token.
    private const string Tricky =
        "ROMEO:\nBut, soft! what light through yonder window breaks?\n\n\nIt is the east, and Juliet is the sun.\r\n" +
        "  indented line\n\t\ttabs\n12345678 + 9 = 12345687.\nI'll don't we've THEY'RE\n" +
        "é€ 🙂 naïve café — “quotes”\n<|endoftext|>next\n.\n,\nx\ny\n\n  \n a b c d e f g h i j k l m n o p\n";

    /// <summary>The text split into files at arbitrary byte positions (mid-line, mid-character): only the concatenation counts.</summary>
    private static string[] WriteParts(string dir, byte[] text, params int[] cuts)
    {
        var files = new List<string>();
        int from = 0;
        foreach (var cut in cuts.Append(text.Length))
        {
            var path = Path.Combine(dir, $"part{files.Count}.txt");
            File.WriteAllBytes(path, text[from..cut]);
            files.Add(path);
            from = cut;
        }
        return [.. files];
    }

    private static int[] ReadAll(string dir)
    {
        using var mapped = MappedTokens.Open(dir);
        var tokens = new int[mapped.Count];
        for (long i = 0; i < tokens.Length; i++) tokens[i] = mapped[i];
        return tokens;
    }

    [Theory]
    [InlineData("bytes")]
    [InlineData("gpt2")]
    [InlineData("cl100k")]
    [InlineData("o200k")]
    public void Prepared_shards_hold_the_tokens_of_the_whole_concatenated_text(string name)
    {
        var tokenizer = Tokenizers.For(name);
        var text = Encoding.UTF8.GetBytes(string.Concat(Enumerable.Repeat(Tricky, 12)) + Encoding.ASCII.GetString(DefaultCorpus.Generate(20_000)));
        var dir = TestSupport.TempDir();
        var files = WriteParts(dir, text, 7, 1000, 1001, 5003);
        var expected = tokenizer.Encode(text);
        // Blocks of 61 bytes: hundreds of borders, every kind of text at one of them somewhere; 97-token shards.
        var r = TokenShards.Prepare(tokenizer, Path.Combine(dir, "shards"), files, shardTokens: 97, blockBytes: 61);
        Assert.Equal(expected, ReadAll(Path.Combine(dir, "shards")));
        Assert.Equal(expected.Length, r.Index.TotalTokens);
        Assert.Equal(text.Length, r.Index.SourceBytes);
        Assert.Equal((expected.Length + 96) / 97, r.Index.Shards.Count);
        Assert.Equal(name, r.Index.Tokenizer);
        Assert.Equal(tokenizer.VocabSize, r.Index.VocabSize);
    }

    [Fact]
    public void A_text_without_a_safe_border_is_held_until_one_comes_and_still_encodes_as_one()
    {
        var gpt2 = Tokenizers.For("gpt2");
        var text = Encoding.UTF8.GetBytes(new string('=', 5000) + "\n\n\n" + new string(' ', 300) + "12345678901234567890" + "word\nWord");
        var dir = TestSupport.TempDir();
        TokenShards.Prepare(gpt2, Path.Combine(dir, "s"), WriteParts(dir, text, 2500), shardTokens: 10, blockBytes: 64);
        Assert.Equal(gpt2.Encode(text), ReadAll(Path.Combine(dir, "s")));
        Assert.Equal(0, StreamingEncoder.LastSafeBorder("aaa\n\nbbb"u8));
        Assert.Equal(0, StreamingEncoder.LastSafeBorder("aaa\r\nbbb"u8));
        Assert.Equal(4, StreamingEncoder.LastSafeBorder("aaa\nbbb"u8));
        Assert.Equal(3, StreamingEncoder.LastSafeBorder("aaa bbb"u8));
    }

    [Theory]
    [InlineData("bytes", 2)]
    [InlineData("gpt2", 2)]
    [InlineData("cl100k", 4)]
    public void Tokens_are_stored_as_uint16_when_the_vocabulary_fits_else_uint32(string name, int bytes)
    {
        Assert.Equal(2, ShardIndex.TokenBytesFor(65536));
        Assert.Equal(4, ShardIndex.TokenBytesFor(65537));
        var tokenizer = Tokenizers.For(name);
        var dir = TestSupport.TempDir();
        var text = Encoding.UTF8.GetBytes(string.Concat(Enumerable.Repeat(Tricky, 4)));
        var r = TokenShards.Prepare(tokenizer, Path.Combine(dir, "s"), WriteParts(dir, text), shardTokens: 50);
        Assert.Equal(bytes, r.Index.TokenBytes);
        foreach (var s in r.Index.Shards)
            Assert.Equal(s.Tokens * bytes, new FileInfo(Path.Combine(dir, "s", s.File)).Length);
        // The largest id survives the width: cl100k ids go past 65,535.
        Assert.Equal(tokenizer.Encode(text).Max(), ReadAll(Path.Combine(dir, "s")).Max());
    }

    private static string Prepared(string tokenizer = "bytes", int size = 30_000, long shardTokens = 4096)
    {
        var dir = TestSupport.TempDir();
        TokenShards.Prepare(Tokenizers.For(tokenizer), Path.Combine(dir, "s"), WriteParts(dir, DefaultCorpus.Generate(size), size / 3), shardTokens);
        return Path.Combine(dir, "s");
    }

    [Fact]
    public void A_damaged_or_truncated_shard_is_refused_at_open_naming_the_file()
    {
        var dir = Prepared();
        var shard = Path.Combine(dir, TokenShards.ShardFileName(2));
        var bytes = File.ReadAllBytes(shard);
        bytes[100] ^= 0x01;
        File.WriteAllBytes(shard, bytes);
        var e = Assert.Throws<InvalidDataException>(() => TextCorpus.Load(dir, 0.1, 16));
        Assert.Contains("shard-00002.bin", e.Message);
        Assert.Contains("SHA-256", e.Message);
        Assert.Contains("shard-00002.bin", Assert.Throws<InvalidDataException>(() => TokenShards.Verify(dir)).Message);

        File.WriteAllBytes(shard, bytes[..^2]);
        e = Assert.Throws<InvalidDataException>(() => TextCorpus.Load(dir, 0.1, 16));
        Assert.Contains("shard-00002.bin", e.Message);
        Assert.Contains("truncated", e.Message);

        // The CLI: exit 2 (bad input) and the file named.
        var (stdout, stderr) = (new StringWriter(), new StringWriter());
        Assert.Equal(2, ElasticMoE.Cli.Program.Run(["data", "verify", dir], stdout, stderr));
        Assert.Contains("shard-00002.bin", stderr.ToString());
    }

    [Fact]
    public void Shards_of_another_tokenizer_than_the_runs_are_a_clear_error()
    {
        var dir = Prepared("gpt2", 8000);
        var e = Assert.Throws<InvalidDataException>(() => TextCorpus.Load(dir, 0.1, 16, Tokenizers.For("bytes")));
        Assert.Contains("gpt2", e.Message);
        Assert.Contains("data.tokenizer", e.Message);
        Assert.Contains("bytes", e.Message);
        using var ok = TextCorpus.Load(dir, 0.1, 16, Tokenizers.For("gpt2"));
        Assert.Equal("gpt2", ok.Tokenizer.Name);
    }

    [Fact]
    public void Train_takes_a_shard_directory_as_its_data_and_names_a_tokenizer_mismatch()
    {
        var dir = Prepared(size: 20_000, shardTokens: 3000);
        string[] small = [.. TestSupport.SetArguments(TestSupport.SmallSettings(("train.eval-every", "2")))];
        var (stdout, stderr) = (new StringWriter(), new StringWriter());
        Assert.Equal(0, ElasticMoE.Cli.Program.Run(["train", "--single-process", "--data", dir, "--steps", "2", .. small], stdout, stderr));
        Assert.Contains("on s (", stdout.ToString());   // the shard directory's name, its train / validation tokens after it
        Assert.Contains("step     2/2", stdout.ToString());

        (stdout, stderr) = (new StringWriter(), new StringWriter());
        Assert.Equal(2, ElasticMoE.Cli.Program.Run(["train", "--single-process", "--data", dir, "--steps", "2", .. small, "--set", "data.tokenizer=gpt2"], stdout, stderr));
        Assert.Contains("the shards are bytes tokens", stderr.ToString());
        Assert.Contains("data.tokenizer is gpt2", stderr.ToString());
    }

    [Fact]
    public void The_data_bench_suite_reports_its_figures_and_removes_its_corpus()
    {
        var json = Path.Combine(TestSupport.TempDir(), "bench.json");
        var (stdout, stderr) = (new StringWriter(), new StringWriter());
        int code = ElasticMoE.Cli.Program.Run(["bench", "--suite", "data", "--corpus-gib", "0.002", "--steps", "12", "--json", json,
            .. TestSupport.SetArguments(TestSupport.SmallSettings())], stdout, stderr);
        Assert.True(code == 0, stderr.ToString());
        var output = stdout.ToString();
        Assert.DoesNotContain('\u001b', output);
        var root = System.Text.RegularExpressions.Regex.Match(output, @"corpus in (\S+),").Groups[1].Value;
        Assert.StartsWith(Path.GetTempPath(), root);
        Assert.False(Directory.Exists(root), $"{root} is removed at the end");
        using var doc = System.Text.Json.JsonDocument.Parse(File.ReadAllText(json));
        var figures = doc.RootElement.EnumerateArray().ToDictionary(f => f.GetProperty("Name").GetString()!, f => f);
        Assert.True(figures["data prepare rate"].GetProperty("Value").GetDouble() > 0);
        Assert.True(figures["data path per step"].GetProperty("BaselineValue").GetDouble() > 0, "the training step, same run");
        if (OperatingSystem.IsLinux())
        {
            Assert.True(figures["RssAnon at step 12"].GetProperty("Value").GetDouble() > 0);
            Assert.True(figures["RssAnon at step 12"].GetProperty("BaselineValue").GetDouble() > 0, "RssAnon at step 10");
        }
    }

    [Fact]
    public void The_fingerprint_covers_the_index_and_the_split()
    {
        var (a, b) = (Prepared(), Prepared());
        using var ca = TextCorpus.Load(a, 0.1, 16);
        using var cb = TextCorpus.Load(b, 0.1, 16);
        using var other = TextCorpus.Load(a, 0.2, 16);
        using var resharded = TextCorpus.Load(Prepared(shardTokens: 1000), 0.1, 16);
        Assert.Equal(ca.Fingerprint, cb.Fingerprint);
        Assert.NotEqual(ca.Fingerprint, other.Fingerprint);
        Assert.NotEqual(ca.Fingerprint, resharded.Fingerprint);
        Assert.Equal(TrainingState.RunFingerprint(TestSupport.SmallConfig(), ca.Fingerprint), TrainingState.RunFingerprint(TestSupport.SmallConfig(), cb.Fingerprint));
        Assert.Throws<InvalidDataException>(() => TokenShards.Prepare(ByteTokenizer.Instance, a, [Path.Combine(Path.GetDirectoryName(a)!, "part0.txt")]));
    }

    [Fact]
    public void The_split_and_every_token_equal_the_in_memory_corpus_of_the_same_text()
    {
        var text = DefaultCorpus.Generate(30_000);
        var dir = TestSupport.TempDir();
        var file = Path.Combine(dir, "all.txt");
        File.WriteAllBytes(file, text);
        TokenShards.Prepare(ByteTokenizer.Instance, Path.Combine(dir, "s"), [file], shardTokens: 1000);
        var memory = TextCorpus.Load(file, 0.1, 16);
        using var mapped = TextCorpus.Load(Path.Combine(dir, "s"), 0.1, 16);
        Assert.Equal(memory.TrainLength, mapped.TrainLength);
        Assert.Equal(memory.ValidationLength, mapped.ValidationLength);
        for (long i = 0; i < memory.TrainLength; i++) Assert.Equal(memory.TrainToken(i), mapped.TrainToken(i));
        for (long i = 0; i < memory.ValidationLength; i++) Assert.Equal(memory.ValidationToken(i), mapped.ValidationToken(i));
        Assert.Equal(Path.Combine(dir, "s"), mapped.ShardDirectory);
    }

    /// <summary>Text file and its shards (1,000-token shards: many sequences cross a shard border) as two corpora of one run.</summary>
    internal static (TextCorpus Memory, TextCorpus Mapped) Both(string tokenizer = "bytes")
    {
        var dir = TestSupport.TempDir();
        var file = Path.Combine(dir, "all.txt");
        File.WriteAllBytes(file, DefaultCorpus.Generate(60_000));
        TokenShards.Prepare(Tokenizers.For(tokenizer), Path.Combine(dir, "s"), [file], shardTokens: 1000);
        return (TextCorpus.Load(file, 0.1, 16, Tokenizers.For(tokenizer)), TextCorpus.Load(Path.Combine(dir, "s"), 0.1, 16, Tokenizers.For(tokenizer)));
    }

    [Fact]
    public void Training_on_shards_gives_the_in_memory_curve_bit_for_bit()
    {
        var cfg = TestSupport.SmallConfig(("train.steps", "8"));
        var (memory, mapped) = Both();
        using var _ = mapped;
        using var a = new Trainer(cfg, memory);
        using var b = new Trainer(cfg, mapped);
        for (int s = 0; s < 8; s++)
        {
            var (x, y) = (a.TrainStep(), b.TrainStep());
            Assert.True(x.Loss.Equals(y.Loss) && x.GradNorm.Equals(y.GradNorm), $"step {s}: {x.Loss:R}/{x.GradNorm:R} vs {y.Loss:R}/{y.GradNorm:R}");
        }
        Assert.Equal(a.Evaluate(), b.Evaluate());
    }
}

/// <summary>The in-process cluster on shards: every node reads the same mapped tokens, without moving data.</summary>
[Collection("cluster")]
public class TokenShardClusterTests
{
    [Fact]
    public async Task A_cluster_on_shards_matches_the_in_memory_single_process_loop_bit_for_bit()
    {
        const int steps = 6;
        var cfg = TestSupport.SmallConfig(("train.steps", steps.ToString()), ("cluster.nodes", "2"), ("train.eval-every", "100"));
        var (memory, mapped) = TokenShardTests.Both();
        using var _ = mapped;
        List<StepResult> reference;
        using (var t = new Trainer(cfg, memory)) reference = Enumerable.Range(0, steps).Select(_ => t.TrainStep()).ToList();
        using var report = new TrainingReport(TextWriter.Null, null);
        var result = await LocalCluster.RunAsync(cfg, mapped, report).WaitAsync(TimeSpan.FromMinutes(3));
        ElasticMoE.Tests.Cluster.SingleProcessReference.AssertStepsIdentical("2 nodes on shards", result.Steps, reference);
    }
}
