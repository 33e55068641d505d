using System.CommandLine;
using System.Globalization;
using ElasticMoE.Data;

namespace ElasticMoE.Cli;

/// <summary>
/// <c>elasticmoe data prepare|verify</c>: text files into memory-mappable token shards (what <c>train --data DIR</c> reads),
/// and checking them.
/// </summary>
public static class DataCommands
{
    public static Command Create(TextWriter stdout, TextWriter stderr)
    {
        var cmd = new Command("data", "prepare token shards from text files (train --data DIR reads them), or verify them");

        var prepare = new Command("prepare", "tokenize text files, streamed as one text, into fixed-size token shards and an index.json");
        var tokenizer = new Option<string>("--tokenizer") { Description = $"one of {string.Join(", ", Tokenizers.Names)} (the run's data.tokenizer must be the same)", DefaultValueFactory = _ => "bytes" };
        tokenizer.AcceptOnlyFromAmong([.. Tokenizers.Names]);
        var output = new Option<string>("--out") { Description = "directory for the shards and index.json (created; must not hold a prepared corpus)", Required = true };
        var shardTokens = new Option<long>("--shard-tokens") { Description = $"tokens per shard (default {TokenShards.DefaultShardTokens})", DefaultValueFactory = _ => TokenShards.DefaultShardTokens };
        shardTokens.Validators.Add(r =>
        {
            try
            {
                if (r.GetValueOrDefault<long>() <= 0) r.AddError("--shard-tokens must be a positive integer");
            }
            catch (InvalidOperationException) { }
        });
        var files = new Argument<string[]>("FILES") { Description = "text files, tokenized as their concatenation in this order", Arity = ArgumentArity.OneOrMore };
        prepare.Options.Add(tokenizer);
        prepare.Options.Add(output);
        prepare.Options.Add(shardTokens);
        prepare.Arguments.Add(files);
        prepare.SetAction(p => Program.Guard(stderr, () => Prepare(Tokenizers.For(p.GetValue(tokenizer)!), p.GetValue(output)!, p.GetValue(files)!, p.GetValue(shardTokens), stdout)));

        var verify = new Command("verify", "check every shard of a prepared directory against its index (size and SHA-256); exit 2 naming a bad shard");
        var dir = new Argument<string>("DIR") { Description = "a directory written by data prepare" };
        verify.Arguments.Add(dir);
        verify.SetAction(p => Program.Guard(stderr, () => Verify(p.GetValue(dir)!, stdout)));

        cmd.Subcommands.Add(prepare);
        cmd.Subcommands.Add(verify);
        return cmd;
    }

    private static int Prepare(ITokenizer tokenizer, string outDir, string[] files, long shardTokens, TextWriter stdout)
    {
        foreach (var f in files)
            if (!File.Exists(f)) throw new FileNotFoundException($"data file not found: {f}", f);
        long total = files.Sum(f => new FileInfo(f).Length);
        stdout.WriteLine(string.Create(CultureInfo.InvariantCulture, $"data prepare: {files.Length} file(s), {total / 1e6:F1} MB, {tokenizer.Name} tokens into {outDir}, {shardTokens} tokens per shard"));
        PrepareResult r;
        using (var progress = Progress.Start(stdout, "data prepare", total, "B"))
        {
            r = TokenShards.Prepare(tokenizer, outDir, files, shardTokens, progress: progress.Report);
            progress.Done();
        }
        var ix = r.Index;
        stdout.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"{ix.TotalTokens:N0} tokens ({ix.TokenBytes * 8}-bit) in {ix.Shards.Count} shard(s) from {ix.SourceBytes:N0} bytes in {r.Seconds:F1} s: " +
            $"{r.MegabytesPerSecond:F1} MB/s, {r.TokensPerSecond:F0} tokens/s; index {Path.Combine(outDir, ShardIndex.FileName)}"));
        return Program.ExitCodes.Ok;
    }

    private static int Verify(string dir, TextWriter stdout)
    {
        var clock = System.Diagnostics.Stopwatch.StartNew();
        var listed = ShardIndex.Read(dir);
        ShardIndex ix;
        using (var progress = Progress.Start(stdout, "data verify", listed.TotalTokens * listed.TokenBytes, "B"))
        {
            ix = TokenShards.Verify(dir, progress.Report);
            progress.Done();
        }
        stdout.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"ok: {ix.Shards.Count} shard(s), {ix.TotalTokens:N0} {ix.Tokenizer} tokens, every SHA-256 matches ({clock.Elapsed.TotalSeconds:F1} s)"));
        return Program.ExitCodes.Ok;
    }
}
