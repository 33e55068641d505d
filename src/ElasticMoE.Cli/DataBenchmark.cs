using System.Diagnostics;
using System.Globalization;
using ElasticMoE.Benchmarks;
using ElasticMoE.Configuration;
using ElasticMoE.Data;
using ElasticMoE.Training;

namespace ElasticMoE.Cli;

/// <summary>
/// <c>bench --suite data</c>: a generated multi-GiB corpus through <c>data prepare</c> (its rate), opened as shards (the
/// SHA-256 check) and trained on for a number of steps, with the process's memory at step 10 and at the last step, and
/// the data path's time per step against the step's.
/// </summary>
/// <remarks>
/// Memory is read from /proc/self/status as RssAnon (heap, libtorch's tensors: what must stay flat) and RssFile
/// (file-backed pages, among them the mapped shards' pages touched so far: they grow with the pages sampled, up to the
/// corpus, and the kernel drops them under pressure, so they are not memory the corpus costs). The data path is timed
/// by building the step's micro-batches just before the step does (the first touch of their pages, page faults
/// included); the step then finds them warm. Everything lives in a temporary directory, removed at the end.
/// </remarks>
public static class DataBenchmark
{
    /// <param name="ShardKb">Of <paramref name="FileKb"/>, the resident pages of the mapped shards (from /proc/self/smaps).</param>
    public sealed record Memory(long RssKb, long AnonKb, long FileKb, long ShardKb)
    {
        /// <summary>This process's resident set now (zeros off Linux); <paramref name="shards"/> picks the shards' mappings out.</summary>
        public static Memory Now(string? shards = null)
        {
            if (!File.Exists("/proc/self/status")) return new(0, 0, 0, 0);
            static long Kb(string line, int from) => long.Parse(line[from..].Trim().Split(' ')[0], CultureInfo.InvariantCulture);
            long Field(string[] lines, string name) => lines.FirstOrDefault(l => l.StartsWith(name + ":", StringComparison.Ordinal)) is { } l ? Kb(l, name.Length + 1) : 0;
            var status = File.ReadAllLines("/proc/self/status");
            long shardKb = 0;
            if (shards is not null)
            {
                bool inShard = false;
                foreach (var line in File.ReadLines("/proc/self/smaps"))
                {
                    // A mapping's header is "start-end perms offset dev inode [path]" (lower-case hex first); its fields
                    // follow, each a capitalised name ("Rss:" among them).
                    if (line.Length > 0 && (char.IsAsciiDigit(line[0]) || line[0] is >= 'a' and <= 'f'))
                    {
                        var h = line.Split(' ', 6, StringSplitOptions.RemoveEmptyEntries);
                        inShard = h.Length == 6 && h[5].Trim().StartsWith(shards, StringComparison.Ordinal);
                    }
                    else if (inShard && line.StartsWith("Rss:", StringComparison.Ordinal)) shardKb += Kb(line, 4);
                }
            }
            return new(Field(status, "VmRSS"), Field(status, "RssAnon"), Field(status, "RssFile"), shardKb);
        }

        public override string ToString() => string.Create(CultureInfo.InvariantCulture,
            $"RSS {RssKb / 1024.0:F0} MiB (anon {AnonKb / 1024.0:F0}, file {FileKb / 1024.0:F0}, of which shard pages {ShardKb / 1024.0:F0})");
    }

    public static IEnumerable<BenchFigure> Run(ElasticMoEConfig config, double gib, int steps, TextWriter log)
    {
        var tokenizer = Tokenizers.For(config.Model.Tokenizer);
        var root = Path.Combine(Path.GetTempPath(), $"elasticmoe-bench-data-{Guid.NewGuid():N}");
        var figures = new List<BenchFigure>();
        try
        {
            long bytes = (long)(gib * (1L << 30));
            log.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"data: a generated {gib:F2} GiB corpus in {root}, prepared as {tokenizer.Name} shards, then {steps} steps of the configured model on them, {TorchSharp.torch.get_num_threads()} threads ..."));
            var clock = Stopwatch.StartNew();
            var files = WriteCorpus(Path.Combine(root, "text"), bytes, 4);
            log.WriteLine(string.Create(CultureInfo.InvariantCulture, $"  generated {files.Count} files, {bytes / 1e9:F2} GB in {clock.Elapsed.TotalSeconds:F1} s"));

            var shards = Path.Combine(root, "shards");
            using (var progress = Progress.Start(log, "data prepare", bytes, "B"))
            {
                var r = TokenShards.Prepare(tokenizer, shards, files, progress: progress.Report);
                progress.Done();
                log.WriteLine(string.Create(CultureInfo.InvariantCulture,
                    $"  prepare: {r.Index.TotalTokens:N0} tokens in {r.Index.Shards.Count} shards in {r.Seconds:F1} s: {r.MegabytesPerSecond:F1} MB/s, {r.TokensPerSecond / 1e6:F2} M tokens/s"));
                figures.Add(new("data prepare rate", r.MegabytesPerSecond, "MB/s"));
                figures.Add(new("data prepare tokens/s", r.TokensPerSecond, "tok/s"));
            }
            // The text is not needed any more: half the disk back before training.
            Directory.Delete(Path.Combine(root, "text"), recursive: true);

            clock.Restart();
            using var corpus = TextCorpus.Load(shards, config.Data.ValidationFraction, config.Model.Context, tokenizer);
            double open = clock.Elapsed.TotalSeconds;
            long shardBytes = Directory.GetFiles(shards, "shard-*.bin").Sum(f => new FileInfo(f).Length);
            log.WriteLine(string.Create(CultureInfo.InvariantCulture, $"  open: {shardBytes / 1e9:F2} GB of shards checked (SHA-256) and mapped in {open:F1} s; {Memory.Now(Path.GetFullPath(shards))}"));
            figures.Add(new("shard open (SHA-256 check)", shardBytes / 1e6 / open, "MB/s"));

            var run = config with { Train = config.Train with { Steps = steps, EvalEvery = 1_000_000, TimeLimitSeconds = 0 } };
            using var trainer = new Trainer(run, corpus);
            var t = run.Train;
            double dataSeconds = 0, stepSeconds = 0;
            Memory? at10 = null, last = null;
            using var bar = Progress.Start(log, "data: training on shards", steps, "steps");
            for (int s = 1; s <= steps; s++)
            {
                var d = Stopwatch.StartNew();
                for (int m = 0; m < t.MicroBatchesPerStep; m++)
                {
                    var (x, y) = trainer.Sampler.TrainBatch(trainer.Step, m * t.MicroBatch, t.MicroBatch);
                    x.Dispose();
                    y.Dispose();
                }
                dataSeconds += d.Elapsed.TotalSeconds;
                stepSeconds += trainer.TrainStep().Seconds;
                bar.Report(s);
                if (s == Math.Min(10, steps)) at10 = Memory.Now(Path.GetFullPath(shards));
                if (s == steps) last = Memory.Now(Path.GetFullPath(shards));
            }
            bar.Done();
            log.WriteLine($"  step {Math.Min(10, steps)}: {at10}; step {steps}: {last}");
            log.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"  data path {1000 * dataSeconds / steps:F3} ms per step ({t.GlobalBatch} sequences of {run.Model.Context + 1} tokens), training step {1000 * stepSeconds / steps:F1} ms"));
            figures.Add(new($"RSS at step {steps}", last!.RssKb / 1024.0, "MiB", $"RSS at step {Math.Min(10, steps)}", at10!.RssKb / 1024.0));
            figures.Add(new($"RssAnon at step {steps}", last.AnonKb / 1024.0, "MiB", $"RssAnon at step {Math.Min(10, steps)}", at10.AnonKb / 1024.0));
            figures.Add(new($"RssFile at step {steps}", last.FileKb / 1024.0, "MiB", $"RssFile at step {Math.Min(10, steps)}", at10.FileKb / 1024.0));
            figures.Add(new($"shard pages resident at step {steps}", last.ShardKb / 1024.0, "MiB", $"at step {Math.Min(10, steps)}", at10.ShardKb / 1024.0));
            figures.Add(new("data path per step", 1000 * dataSeconds / steps, "ms", "training step", 1000 * stepSeconds / steps));
        }
        finally
        {
            if (Directory.Exists(root)) Directory.Delete(root, recursive: true);
        }
        return figures;
    }

    /// <summary>
    /// <paramref name="bytes"/> of text of the default corpus's grammar in <paramref name="count"/> files, written in 8 MB
    /// blocks of different seeds (so the text does not repeat), never more than a block in memory.
    /// </summary>
    private static List<string> WriteCorpus(string dir, long bytes, int count)
    {
        Directory.CreateDirectory(dir);
        var files = new List<string>();
        ulong block = 0;
        for (int f = 0; f < count; f++)
        {
            var path = Path.Combine(dir, $"corpus-{f}.txt");
            long want = bytes / count + (f < bytes % count ? 1 : 0), written = 0;
            using (var stream = new FileStream(path, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 20))
                while (written < want)
                {
                    var text = DefaultCorpus.Generate(8_000_000, 0x5EED0000UL + block++);
                    int n = (int)Math.Min(text.Length, want - written);
                    stream.Write(text, 0, n);
                    written += n;
                }
            files.Add(path);
        }
        return files;
    }
}
