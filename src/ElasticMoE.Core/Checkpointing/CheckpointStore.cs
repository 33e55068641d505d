using System.Globalization;
using System.Text.RegularExpressions;
using ElasticMoE.State;

namespace ElasticMoE.Checkpointing;

/// <summary>Raised when a run directory has committed checkpoints but none of them verifies; the message names every bad file.</summary>
public sealed class CheckpointCorruptException(string message) : Exception(message);

/// <summary>One thing wrong with a checkpoint: the file (relative to the run directory) and what is wrong with it.</summary>
public sealed record CheckpointProblem(string File, string What)
{
    public override string ToString() => $"{File}: {What}";
}

/// <summary>The outcome of <see cref="CheckpointStore.LoadNewestValid"/>: the checkpoint (null when none was ever committed) and the warnings met.</summary>
public sealed record CheckpointLoad(VerifiedCheckpoint? Checkpoint, IReadOnlyList<string> Warnings);

/// <summary>
/// A checkpoint whose every file was read into memory and checked — commit log entry, manifest hash,
/// sizes, SHA-256s, shard layout, every unit's checksum — before this object exists. Nothing can be
/// loaded from a checkpoint except through one, so nothing is ever loaded from a bad file, and the
/// bytes checked are the very bytes used (no re-read between check and use).
/// </summary>
public sealed class VerifiedCheckpoint
{
    internal VerifiedCheckpoint(CheckpointCommit commit, CheckpointManifest manifest, string directory, SortedDictionary<UnitId, byte[]> units)
    {
        Commit = commit;
        Manifest = manifest;
        Directory = directory;
        UnitBlobs = units;
    }

    public CheckpointCommit Commit { get; }
    public CheckpointManifest Manifest { get; }

    /// <summary>Full path of the checkpoint directory.</summary>
    public string Directory { get; }

    /// <summary>Steps completed when the state was taken.</summary>
    public long Step => Manifest.Step;

    /// <summary>Every unit's blob, as <see cref="StateUnit.Export"/> gave it (checksum verified); <see cref="StateUnit.Import"/> takes it.</summary>
    public IReadOnlyDictionary<UnitId, byte[]> UnitBlobs { get; }

    /// <summary>The <c>format</c> metadata of an exported model file.</summary>
    public const string ModelFormat = "elasticmoe.model.v1";

    /// <summary>
    /// Writes the whole model's parameters and buffers (the router biases, which routing needs) as ONE
    /// safetensors file under the model's own tensor names (<c>embed.weight</c>, <c>blocks.0.…</c>),
    /// without optimizer moments: what inference or another tool needs, in a format they all read.
    /// Metadata: <c>format</c>, <c>step</c>, <c>model</c>, <c>run_fingerprint</c>. Written atomically.
    /// </summary>
    public (long Bytes, string Sha256) ExportModel(string path)
    {
        var tensors = new List<RawTensor>();
        foreach (var blob in UnitBlobs.Values)
        {
            var file = Safetensors.Read(blob);
            foreach (var e in file.Entries)
            {
                int slash = e.Name.IndexOf('/');
                if (e.Name[..(slash + 1)] is "param/" or "buffer/")
                    tensors.Add(new RawTensor(e.Name[(slash + 1)..], e.DType, e.Shape, file.Bytes(e)));
            }
        }
        var metadata = new Dictionary<string, string>(StringComparer.Ordinal)
        {
            ["format"] = ModelFormat,
            ["step"] = Step.ToString(CultureInfo.InvariantCulture),
            ["model"] = Manifest.Model,
            ["run_fingerprint"] = Manifest.RunFingerprint,
        };
        return DurableFile.Write(path, s => Safetensors.WriteRaw(s, tensors, metadata));
    }
}

/// <summary>
/// The checkpoints of one run directory: <c>step-NNNNNN/</c> directories (shards + <c>manifest.json</c>)
/// and a commit log. Saves, commits, verifies, loads with fallback, and deletes old checkpoints.
/// </summary>
/// <remarks>
/// <para>
/// The rules that make a crash at any instant safe: shards and then the manifest are each written
/// under a temporary name, fsync'd and renamed; the commit is appended to the log only after all of
/// them are durable; a checkpoint counts only if it is committed AND verifies; the files of a
/// committed checkpoint are never rewritten (a second save of the same step goes to a new
/// directory); and retention deletes a checkpoint only after a newer one is committed, recording the
/// deletion in the log first.
/// </para>
/// <para>
/// Limits: a file is read whole into memory to verify it (2 GiB per shard); only one process saves
/// into a run directory at a time (the coordinator, or the single-process loop).
/// </para>
/// </remarks>
public sealed partial class CheckpointStore
{
    /// <param name="runDirectory">The run directory (created on the first save).</param>
    /// <param name="log">The commit point; default <see cref="FileCommitLog"/> at <c>commits.log</c> in the run directory.</param>
    /// <param name="keep">How many committed checkpoints to keep (at least 1).</param>
    public CheckpointStore(string runDirectory, ICheckpointCommitLog? log = null, int keep = 2)
    {
        ArgumentException.ThrowIfNullOrEmpty(runDirectory);
        ArgumentOutOfRangeException.ThrowIfLessThan(keep, 1);
        Root = Path.GetFullPath(runDirectory);
        Log = log ?? new FileCommitLog(Path.Combine(Root, FileCommitLog.FileName));
        Keep = keep;
    }

    public string Root { get; }
    public ICheckpointCommitLog Log { get; }
    public int Keep { get; }

    [GeneratedRegex(@"^step-(\d{6,})(?:\.(\d+))?$")]
    private static partial Regex DirectoryPattern();

    /// <summary>The directory name of the first attempt at <paramref name="step"/>.</summary>
    public static string DirectoryName(long step) => string.Create(CultureInfo.InvariantCulture, $"step-{step:D6}");

    /// <summary>The committed checkpoints, oldest first (by step, then commit order).</summary>
    public IReadOnlyList<CheckpointCommit> List() => Ordered(Log.Read().Committed);

    private static List<CheckpointCommit> Ordered(IReadOnlyList<CheckpointCommit> committed)
        => committed.Select((c, i) => (c, i)).OrderBy(x => x.c.Step).ThenBy(x => x.i).Select(x => x.c).ToList();

    /// <summary>
    /// Creates a fresh directory for a save of <paramref name="step"/> and returns its full path. An
    /// uncommitted leftover of the same name (a save that crashed) is removed first; a committed one
    /// is never touched: the new attempt gets the next name (<c>step-000123.2</c>, …).
    /// </summary>
    public string BeginSave(long step)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(step);
        var committed = Log.Read().Committed.Select(c => c.Directory).ToHashSet(StringComparer.Ordinal);
        var name = DirectoryName(step);
        for (int attempt = 2; committed.Contains(name); attempt++)
            name = string.Create(CultureInfo.InvariantCulture, $"{DirectoryName(step)}.{attempt}");
        var path = Path.Combine(Root, name);
        if (Directory.Exists(path)) Directory.Delete(path, recursive: true);
        Directory.CreateDirectory(path);
        DurableFile.SyncDirectory(Root);
        return path;
    }

    /// <summary>
    /// Commits a checkpoint whose shards are all written and durable: writes the manifest (atomically,
    /// last), appends the commit, then applies retention. A unit written by two shards is refused:
    /// the caller picks one writer per unit (<see cref="CheckpointWriters.Assign"/>).
    /// </summary>
    public CheckpointCommit Commit(string checkpointDirectory, long step, string runFingerprint, string model,
        IReadOnlyDictionary<string, string> layout, IReadOnlyList<ShardInfo> shards)
    {
        ArgumentNullException.ThrowIfNull(shards);
        var directory = Path.GetFullPath(checkpointDirectory);
        if (Path.GetDirectoryName(directory) != Root || !DirectoryPattern().IsMatch(Path.GetFileName(directory)))
            throw new ArgumentException($"{checkpointDirectory} is not a checkpoint directory of {Root} (use BeginSave)", nameof(checkpointDirectory));
        var units = new SortedDictionary<UnitId, string>();
        foreach (var shard in shards)
            foreach (var unit in shard.Units)
                if (!units.TryAdd(unit, shard.File))
                    throw new ArgumentException($"unit {unit} is written by both {units[unit]} and {shard.File}: a unit is written once", nameof(shards));
        var files = shards.Select(s => new CheckpointFile(s.File, s.Bytes, s.Sha256)).ToList();
        var manifest = new CheckpointManifest(step, runFingerprint, model, layout, files, units);
        var json = manifest.ToJson();
        var (_, sha) = DurableFile.Write(Path.Combine(directory, CheckpointManifest.FileName), s => s.Write(json));
        var commit = new CheckpointCommit(step, Path.GetFileName(directory), sha, files.Select(f => f.Name).Order(StringComparer.Ordinal).ToList());
        Log.AppendCommitted(commit);
        ApplyRetention();
        return commit;
    }

    /// <summary>
    /// A whole save by a single writer (the single-process loop): a fresh directory, one shard of
    /// every unit blob, the commit. Returns the commit.
    /// </summary>
    public CheckpointCommit Save(long step, string runFingerprint, string model, IReadOnlyDictionary<string, string> layout,
        IEnumerable<ReadOnlyMemory<byte>> unitBlobs, string writer = "0")
    {
        var directory = BeginSave(step);
        var shard = ShardFile.Write(directory, writer, step, unitBlobs);
        return Commit(directory, step, runFingerprint, model, layout, [shard]);
    }

    /// <summary>Every problem of the newest committed checkpoint of <paramref name="step"/> (empty: it verifies).</summary>
    /// <exception cref="ArgumentException">No committed checkpoint has that step.</exception>
    public IReadOnlyList<CheckpointProblem> Verify(long step)
    {
        var commit = List().LastOrDefault(c => c.Step == step)
            ?? throw new ArgumentException($"no committed checkpoint of step {step} in {Root}", nameof(step));
        return Verify(commit);
    }

    /// <summary>Every problem of one committed checkpoint (empty: it verifies).</summary>
    public IReadOnlyList<CheckpointProblem> Verify(CheckpointCommit commit)
    {
        var problems = new List<CheckpointProblem>();
        Inspect(commit, problems);
        return problems;
    }

    /// <summary>
    /// The newest committed checkpoint that verifies, read and checked in full. A newer committed one
    /// that does not verify is passed over with a warning naming each bad file. Null (with no
    /// exception) when nothing was ever committed: a fresh run.
    /// </summary>
    /// <exception cref="CheckpointCorruptException">Checkpoints were committed but none verifies.</exception>
    public CheckpointLoad LoadNewestValid()
    {
        var contents = Log.Read();
        var warnings = contents.Problems.Select(p => $"{Path.Combine(Root, FileCommitLog.FileName)}: {p}").ToList();
        var newestFirst = Ordered(contents.Committed);
        newestFirst.Reverse();
        var bad = new List<string>();
        foreach (var commit in newestFirst)
        {
            var problems = new List<CheckpointProblem>();
            if (Inspect(commit, problems) is { } verified)
            {
                if (bad.Count > 0) warnings.Add($"resuming from the older checkpoint {commit.Directory} (step {commit.Step})");
                return new CheckpointLoad(verified, warnings);
            }
            var line = $"checkpoint {commit.Directory} (step {commit.Step}) is damaged and was not loaded: {string.Join("; ", problems)}";
            warnings.Add(line);
            bad.Add(line);
        }
        if (bad.Count == 0) return new CheckpointLoad(null, warnings);
        throw new CheckpointCorruptException($"no committed checkpoint in {Root} verifies:\n  {string.Join("\n  ", bad)}");
    }

    /// <summary>The newest committed checkpoint of <paramref name="step"/>, read and checked in full (evaluating an older step).</summary>
    /// <exception cref="FileNotFoundException">No committed checkpoint has that step; the message lists those that do.</exception>
    /// <exception cref="CheckpointCorruptException">It does not verify; the message names every bad file.</exception>
    public VerifiedCheckpoint Load(long step)
    {
        var committed = List();
        var commit = committed.LastOrDefault(c => c.Step == step)
            ?? throw new FileNotFoundException(string.Create(CultureInfo.InvariantCulture,
                $"no committed checkpoint of step {step} in {Root} (committed: {(committed.Count == 0 ? "none" : string.Join(", ", committed.Select(c => c.Step)))})"));
        var problems = new List<CheckpointProblem>();
        return Inspect(commit, problems)
            ?? throw new CheckpointCorruptException($"checkpoint {commit.Directory} (step {step}) is damaged: {string.Join("; ", problems)}");
    }

    /// <summary>Reads and checks everything of a commit; the verified checkpoint, or null with the problems added.</summary>
    private VerifiedCheckpoint? Inspect(CheckpointCommit commit, List<CheckpointProblem> problems)
    {
        int before = problems.Count;
        var directory = Path.Combine(Root, commit.Directory);
        string Rel(string file) => $"{commit.Directory}/{file}";
        void Problem(string file, string what) => problems.Add(new CheckpointProblem(Rel(file), what));

        var manifestPath = Path.Combine(directory, CheckpointManifest.FileName);
        if (!File.Exists(manifestPath))
        {
            Problem(CheckpointManifest.FileName, "missing");
            return null;
        }
        var manifestBytes = File.ReadAllBytes(manifestPath);
        var manifestSha = DurableFile.Sha256(manifestBytes);
        if (manifestSha != commit.ManifestSha256)
        {
            Problem(CheckpointManifest.FileName, $"does not match the commit log (edited, replaced or corrupted): SHA-256 {manifestSha}, committed {commit.ManifestSha256}");
            return null;
        }
        CheckpointManifest manifest;
        try
        {
            manifest = CheckpointManifest.Parse(manifestBytes);
        }
        catch (CheckpointFormatException e)
        {
            Problem(CheckpointManifest.FileName, e.Message);
            return null;
        }
        if (manifest.Step != commit.Step) Problem(CheckpointManifest.FileName, $"says step {manifest.Step}, the commit log {commit.Step}");
        if (!manifest.Files.Select(f => f.Name).Order(StringComparer.Ordinal).SequenceEqual(commit.Files.Order(StringComparer.Ordinal)))
            Problem(CheckpointManifest.FileName, $"lists files [{string.Join(", ", manifest.Files.Select(f => f.Name))}], the commit log [{string.Join(", ", commit.Files)}]");

        var blobs = new SortedDictionary<UnitId, byte[]>();
        foreach (var file in manifest.Files)
        {
            var path = Path.Combine(directory, file.Name);
            if (file.Name.Contains('/') || file.Name.Contains('\\') || !File.Exists(path))
            {
                Problem(file.Name, "missing");
                continue;
            }
            var length = new FileInfo(path).Length;
            if (length != file.Bytes)
            {
                Problem(file.Name, $"{length} bytes, the manifest says {file.Bytes} ({(length < file.Bytes ? "truncated" : "extended")})");
                continue;
            }
            var bytes = File.ReadAllBytes(path);
            var sha = DurableFile.Sha256(bytes);
            if (sha != file.Sha256)
            {
                Problem(file.Name, $"SHA-256 mismatch: {sha}, the manifest says {file.Sha256} (corrupted)");
                continue;
            }
            SortedDictionary<UnitId, byte[]> units;
            try
            {
                units = ShardFile.Split(bytes);
            }
            catch (FormatException e)
            {
                Problem(file.Name, $"header corrupt: {e.Message}");
                continue;
            }
            foreach (var (unit, blob) in units)
            {
                if (manifest.Units.GetValueOrDefault(unit) != file.Name)
                {
                    Problem(file.Name, $"holds unit {unit}, which the manifest places {(manifest.Units.TryGetValue(unit, out var other) ? "in " + other : "nowhere")}");
                    continue;
                }
                try
                {
                    var (id, _) = StateUnit.VerifyBlob(blob);
                    if (id != unit) throw new UnitFormatException($"the blob holds unit {id}");
                    blobs[unit] = blob;
                }
                catch (UnitFormatException e)
                {
                    Problem(file.Name, $"unit {unit}: {e.Message}");
                }
            }
        }
        foreach (var (unit, file) in manifest.Units)
            if (!blobs.ContainsKey(unit) && !problems.Skip(before).Any(p => p.File == Rel(file)))
                Problem(file, $"lacks unit {unit}, which the manifest places there");
        return problems.Count == before ? new VerifiedCheckpoint(commit, manifest, directory, blobs) : null;
    }

    /// <summary>
    /// Keeps the newest <see cref="Keep"/> committed checkpoints. Each older one is recorded as retired
    /// in the log, then deleted; directories that belong to no kept checkpoint — retired ones whose
    /// deletion was interrupted, saves that crashed before their commit — are deleted too, up to the
    /// newest committed step (a directory beyond it may be a save in progress).
    /// </summary>
    public void ApplyRetention()
    {
        var committed = List();
        if (committed.Count == 0) return;
        var kept = committed.TakeLast(Keep).ToList();
        foreach (var old in committed.SkipLast(Keep))
        {
            Log.AppendRetired(old);
            var path = Path.Combine(Root, old.Directory);
            if (Directory.Exists(path)) Directory.Delete(path, recursive: true);
        }
        long newest = kept[^1].Step;
        var keptNames = kept.Select(c => c.Directory).ToHashSet(StringComparer.Ordinal);
        foreach (var dir in Directory.GetDirectories(Root))
        {
            var name = Path.GetFileName(dir);
            var match = DirectoryPattern().Match(name);
            if (!match.Success || keptNames.Contains(name)) continue;
            if (long.Parse(match.Groups[1].Value, CultureInfo.InvariantCulture) <= newest) Directory.Delete(dir, recursive: true);
        }
        DurableFile.SyncDirectory(Root);
    }
}

/// <summary>Who writes which unit when several workers hold the same unit (data-parallel replicas).</summary>
public static class CheckpointWriters
{
    /// <summary>
    /// One writer per unit, deterministically: units in canonical order, each to the holder with the
    /// fewest bytes assigned so far (ties: the ordinal-first writer name). Pure, so the coordinator and
    /// every worker compute the same answer from the same placement, and replicas share the writing
    /// instead of the first replica writing everything.
    /// </summary>
    /// <param name="held">The units each writer holds.</param>
    /// <param name="bytes">Size of a unit, to balance by bytes; null balances by unit count.</param>
    /// <returns>Every writer (possibly with no units) and the units it writes, in canonical order.</returns>
    public static SortedDictionary<string, List<UnitId>> Assign(IReadOnlyDictionary<string, IReadOnlyCollection<UnitId>> held, Func<UnitId, long>? bytes = null)
    {
        ArgumentNullException.ThrowIfNull(held);
        var result = new SortedDictionary<string, List<UnitId>>(StringComparer.Ordinal);
        var load = new Dictionary<string, long>(StringComparer.Ordinal);
        foreach (var writer in held.Keys)
        {
            result[writer] = [];
            load[writer] = 0;
        }
        var holders = new SortedDictionary<UnitId, List<string>>();
        foreach (var (writer, units) in held)
            foreach (var unit in units)
            {
                if (!holders.TryGetValue(unit, out var list)) holders[unit] = list = [];
                list.Add(writer);
            }
        foreach (var (unit, list) in holders)
        {
            var chosen = list.OrderBy(w => load[w]).ThenBy(w => w, StringComparer.Ordinal).First();
            result[chosen].Add(unit);
            load[chosen] += bytes?.Invoke(unit) ?? 1;
        }
        return result;
    }
}
