using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using ElasticMoE.Checkpointing;
using ElasticMoE.State;

namespace ElasticMoE.Cli;

/// <summary>
/// <c>elasticmoe checkpoints list|verify|export --run-dir DIR</c>: inspect a run directory's
/// checkpoints without loading a model. <c>verify</c> checks every file of every committed checkpoint
/// and exits 2 (bad input) naming each bad file, so a script can refuse to resume from a damaged run.
/// </summary>
public static class CheckpointCommands
{
    public static Command Create(TextWriter stdout, TextWriter stderr)
    {
        var cmd = new Command("checkpoints", "list, verify or export the checkpoints of a run directory");
        Option<string> RunDir() => new("--run-dir") { Description = "the run directory (holds commits.log and step-NNNNNN/)", Required = true };

        var list = new Command("list", "committed checkpoints: step, directory, files, bytes, units");
        var listDir = RunDir();
        list.Options.Add(listDir);
        list.SetAction(p => Program.Guard(stderr, () => List(new CheckpointStore(p.GetValue(listDir)!), stdout)));

        var verify = new Command("verify", "check every file of every committed checkpoint; exit 2 naming each bad file");
        var verifyDir = RunDir();
        verify.Options.Add(verifyDir);
        verify.SetAction(p => Program.Guard(stderr, () => Verify(new CheckpointStore(p.GetValue(verifyDir)!), stdout, stderr)));

        var export = new Command("export", "write the model's parameters of the newest valid checkpoint as one safetensors file");
        var exportDir = RunDir();
        var output = new Option<string>("--out") { Description = "the safetensors file to write", Required = true };
        export.Options.Add(exportDir);
        export.Options.Add(output);
        export.SetAction(p => Program.Guard(stderr, () => Export(new CheckpointStore(p.GetValue(exportDir)!), p.GetValue(output)!, stdout, stderr)));

        var writer = new Command("crash-writer", "internal: save synthetic checkpoints in a loop until killed (crash-consistency drill)") { Hidden = true };
        var writerDir = RunDir();
        writer.Options.Add(writerDir);
        writer.SetAction(p => CrashDrill.WriteUntilKilled(p.GetValue(writerDir)!, stdout));

        var drill = new Command("crash-drill", "SIGKILL a crash-writer child N times at random points of its saves, checking every restart (bench/checkpoint-crash-drill.sh)") { Hidden = true };
        var drillDir = RunDir();
        var kills = new Option<int>("--kills") { Description = "how many kills", DefaultValueFactory = _ => 1000 };
        drill.Options.Add(drillDir);
        drill.Options.Add(kills);
        drill.SetAction(p => Program.Guard(stderr, () =>
        {
            var r = CrashDrill.Run(p.GetValue(drillDir)!, p.GetValue(kills), new Random(), stdout);
            stdout.WriteLine(r);
            return Program.ExitCodes.Ok;
        }));

        foreach (var c in new[] { list, verify, export, writer, drill }) cmd.Subcommands.Add(c);
        return cmd;
    }

    private static int List(CheckpointStore store, TextWriter stdout)
    {
        var contents = store.Log.Read();
        foreach (var problem in contents.Problems) stdout.WriteLine($"warning: {problem}");
        var committed = store.List();
        if (committed.Count == 0) stdout.WriteLine($"no committed checkpoints in {store.Root}");
        foreach (var c in committed)
        {
            long bytes = c.Files.Sum(f => File.Exists(Path.Combine(store.Root, c.Directory, f)) ? new FileInfo(Path.Combine(store.Root, c.Directory, f)).Length : 0);
            stdout.WriteLine(string.Create(CultureInfo.InvariantCulture, $"step {c.Step,8}  {c.Directory,-16}  {c.Files.Count} files  {bytes,12:N0} bytes  manifest {c.ManifestSha256[..12]}"));
        }
        return Program.ExitCodes.Ok;
    }

    private static int Verify(CheckpointStore store, TextWriter stdout, TextWriter stderr)
    {
        var contents = store.Log.Read();
        int bad = contents.Problems.Count;
        foreach (var problem in contents.Problems) stderr.WriteLine($"bad: {FileCommitLog.FileName}: {problem}");
        var committed = store.List();
        using var progress = Progress.Start(stdout, "checkpoints verify", committed.Count, "checkpoints");
        int done = 0;
        foreach (var c in committed)
        {
            var problems = store.Verify(c);
            if (problems.Count == 0) progress.Writer.WriteLine($"ok   step {c.Step} ({c.Directory})");
            foreach (var problem in problems) stderr.WriteLine($"bad: step {c.Step}: {problem}");
            bad += problems.Count;
            progress.Report(++done);
        }
        progress.Done();
        if (bad == 0) return Program.ExitCodes.Ok;
        stderr.WriteLine($"error: {bad} problem(s) in {store.Root}");
        return Program.ExitCodes.BadInput;
    }

    private static int Export(CheckpointStore store, string output, TextWriter stdout, TextWriter stderr)
    {
        var load = store.LoadNewestValid();
        foreach (var warning in load.Warnings) stderr.WriteLine($"warning: {warning}");
        if (load.Checkpoint is not { } checkpoint) throw new FileNotFoundException($"no committed checkpoint in {store.Root}");
        Inference.ExportedConfig.EnsureWritable(output);
        var (bytes, sha) = checkpoint.ExportModel(output);
        stdout.WriteLine(string.Create(CultureInfo.InvariantCulture, $"exported step {checkpoint.Step} ({checkpoint.Commit.Directory}) to {output}: {bytes:N0} bytes, SHA-256 {sha}"));
        stdout.WriteLine($"wrote {Inference.ExportedConfig.Write(output)} (architecture, sizes, tokenizer, tensor names)");
        return Program.ExitCodes.Ok;
    }
}

/// <summary>
/// The crash-consistency drill: a child process saves synthetic checkpoints (three writers, replicated
/// units, the real shard/manifest/commit path) as fast as it can; the parent SIGKILLs it at a random
/// instant, then checks that the newest valid checkpoint is the newest committed one, that it
/// verifies, and that its content is exactly that step's; and starts the child again, which resumes
/// from there. Used by the test (200 kills) and by <c>checkpoints crash-drill</c> (1000 by default).
/// </summary>
public static class CrashDrill
{
    /// <summary>What a drill saw.</summary>
    /// <param name="Kills">Children killed.</param>
    /// <param name="MidSave">Kills that left a save behind half done (temporary files or an uncommitted directory).</param>
    /// <param name="NewestStep">The step of the last checkpoint.</param>
    public sealed record Result(int Kills, int MidSave, long NewestStep, double Seconds)
    {
        public override string ToString() => string.Create(CultureInfo.InvariantCulture,
            $"{Kills} SIGKILLs in {Seconds:F1} s, {MidSave} of them in the middle of a save; every restart loaded the newest committed checkpoint (last: step {NewestStep}) and it verified");
    }

    private static readonly string[] Writers = ["a", "b", "c"];

    /// <summary>The synthetic units of the drill; expert units are held by two writers, as data-parallel replicas.</summary>
    public static IReadOnlyList<UnitId> Units { get; } =
        [UnitId.Embedding, UnitId.OfBlock(0), UnitId.OfBlock(1), UnitId.Head, .. Enumerable.Range(0, 6).Select(e => UnitId.OfExpert(1, e)), UnitId.OfRouterBias(1)];

    /// <summary>The blob of a synthetic unit at a step: 8 KiB of F32 values that depend on both, so a unit of another step never passes as this one.</summary>
    public static byte[] Blob(UnitId unit, long step)
    {
        // Not HashCode.Combine: it is seeded per process, and the parent must compute the child's values.
        var rng = new Random(unchecked((int)(step * 1_000_003 + (int)unit.Kind * 10_007 + unit.Block * 101 + unit.Expert)));
        var values = new float[2048];
        for (int i = 0; i < values.Length; i++) values[i] = (float)rng.NextDouble() + step;
        var bytes = new byte[values.Length * 4];
        Buffer.BlockCopy(values, 0, bytes, 0, bytes.Length);
        return StateUnit.ExportRaw(unit, step - 1, [new RawTensor("param/w", "F32", [values.Length], bytes)]);
    }

    /// <summary>The child: resumes from the newest valid checkpoint, then saves step after step until killed.</summary>
    public static int WriteUntilKilled(string runDirectory, TextWriter stdout)
    {
        // One save into a scratch directory first: the first save of a process is slow (JIT), and a
        // kill must be able to land in the middle of a steady save, not only during start-up.
        var scratch = Path.Combine(Path.GetTempPath(), $"elasticmoe-crash-warmup-{Environment.ProcessId}");
        SaveLoop(new CheckpointStore(scratch), 0, 1, null);
        Directory.Delete(scratch, recursive: true);
        var store = new CheckpointStore(runDirectory, keep: 2);
        long step = store.LoadNewestValid().Checkpoint?.Step ?? 0;
        stdout.WriteLine($"ready {step}");
        return SaveLoop(store, step, long.MaxValue, stdout);
    }

    /// <summary>Saves steps after <paramref name="step"/> until <paramref name="last"/>, printing each commit.</summary>
    private static int SaveLoop(CheckpointStore store, long step, long last, TextWriter? stdout)
    {
        var held = new Dictionary<string, IReadOnlyCollection<UnitId>>
        {
            ["a"] = Units.Where(u => u.Kind != UnitKind.Expert || u.Expert < 4).ToList(),
            ["b"] = Units.Where(u => u.Kind == UnitKind.Expert).ToList(),
            ["c"] = Units.Where(u => u.Kind is UnitKind.Expert or UnitKind.Head && u.Expert != 0).ToList(),
        };
        var assignment = CheckpointWriters.Assign(held);
        var layout = new Dictionary<string, string> { ["mode"] = "crash-drill", ["workers"] = "3" };
        while (step < last)
        {
            step++;
            var directory = store.BeginSave(step);
            var shards = Writers.Select(w => ShardFile.Write(directory, w, step, assignment[w].Select(u => (ReadOnlyMemory<byte>)Blob(u, step)))).ToList();
            store.Commit(directory, step, "crash-drill", "synthetic", layout, shards);
            stdout?.WriteLine($"committed {step}");
        }
        return Program.ExitCodes.Ok;
    }

    /// <summary>
    /// The parent: <paramref name="kills"/> rounds of start, random delay, SIGKILL, check; then more rounds (up to
    /// four times as many in all) while fewer than <paramref name="midSaveKills"/> kills interrupted a save.
    /// </summary>
    /// <remarks>
    /// Where a kill lands is a matter of timing: on a loaded machine the child may not get the CPU before the
    /// delay runs out and dies before its next save begins (98 of 200 kills mid-save at load average 10, against
    /// ~180 on a quiet box). Killing until enough saves were interrupted makes what the drill tests independent of it.
    /// </remarks>
    /// <exception cref="InvalidOperationException">A check failed; the message says which and where.</exception>
    public static Result Run(string runDirectory, int kills, Random random, TextWriter? progress = null, int midSaveKills = 0)
    {
        var clock = Stopwatch.StartNew();
        long expected = new CheckpointStore(runDirectory).LoadNewestValid().Checkpoint?.Step ?? 0;
        int midSave = 0, kill = 0;
        for (; kill < kills || (midSave < midSaveKills && kill < 4 * kills); kill++)
        {
            var (ready, lastCommitted) = KillOnce(runDirectory, random);
            if (ready != expected) throw new InvalidOperationException($"kill {kill}: the child resumed at step {ready}, the newest committed was {expected}");
            // The child may have committed one step more than it printed: killed between the commit and the line.
            long floor = Math.Max(expected, lastCommitted);
            var store = new CheckpointStore(runDirectory);
            if (HasUnfinishedSave(store)) midSave++;
            var load = store.LoadNewestValid();
            var newest = store.List().LastOrDefault()?.Step ?? 0;
            var checkpoint = load.Checkpoint;
            long step = checkpoint?.Step ?? 0;
            if (load.Warnings.Count > 0) throw new InvalidOperationException($"kill {kill}: loading warned: {string.Join("; ", load.Warnings)}");
            if (step != newest || step < floor || step > floor + 1)
                throw new InvalidOperationException($"kill {kill}: loaded step {step}; newest committed {newest}, last printed {lastCommitted}");
            if (checkpoint is not null)
            {
                if (store.Verify(checkpoint.Commit) is { Count: > 0 } problems) throw new InvalidOperationException($"kill {kill}: {string.Join("; ", problems)}");
                foreach (var unit in Units)
                    if (!checkpoint.UnitBlobs[unit].AsSpan().SequenceEqual(Blob(unit, step)))
                        throw new InvalidOperationException($"kill {kill}: unit {unit} of step {step} does not hold that step's values");
            }
            expected = step;
            if (progress is not null && (kill + 1) % 100 == 0) progress.WriteLine($"{kill + 1} kills, step {step}, {clock.Elapsed.TotalSeconds:F1} s");
        }
        return new Result(kill, midSave, expected, clock.Elapsed.TotalSeconds);
    }

    /// <summary>Temporary files or a directory beyond the newest commit: a save the kill interrupted.</summary>
    private static bool HasUnfinishedSave(CheckpointStore store)
    {
        var committed = store.List().Select(c => c.Directory).ToHashSet();
        return Directory.EnumerateFiles(store.Root, "*" + DurableFile.TempSuffix, SearchOption.AllDirectories).Any()
            || Directory.EnumerateDirectories(store.Root, "step-*").Any(d => !committed.Contains(Path.GetFileName(d)));
    }

    private static (long Ready, long LastCommitted) KillOnce(string runDirectory, Random random)
    {
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in new[] { typeof(Program).Assembly.Location, "checkpoints", "crash-writer", "--run-dir", runDirectory }) psi.ArgumentList.Add(a);
        // Start-up dominates a round: tiered JIT starts the child ~3x faster than the full JIT the trainer wants.
        psi.Environment["DOTNET_TieredCompilation"] = "1";
        psi.Environment["DOTNET_TieredPGO"] = "0";
        using var child = Process.Start(psi)!;
        var stderr = child.StandardError.ReadToEndAsync();
        var first = child.StandardOutput.ReadLine();
        if (first is null || !first.StartsWith("ready ", StringComparison.Ordinal))
        {
            child.WaitForExit();
            throw new InvalidOperationException($"the crash-writer did not start: {first}\n{stderr.Result}");
        }
        long ready = long.Parse(first["ready ".Length..], CultureInfo.InvariantCulture);
        var rest = child.StandardOutput.ReadToEndAsync();
        // A save (three shards, manifest, commit: eight fsyncs) takes a few milliseconds here: a delay
        // of up to 40 ms lands at every point of one, after a random number of earlier ones.
        Thread.Sleep(random.Next(0, 41));
        child.Kill();
        child.WaitForExit();
        long last = ready;
        foreach (var line in rest.Result.Split('\n'))
            if (line.StartsWith("committed ", StringComparison.Ordinal) && long.TryParse(line["committed ".Length..], CultureInfo.InvariantCulture, out var s))
                last = Math.Max(last, s);
        return (ready, last);
    }
}
