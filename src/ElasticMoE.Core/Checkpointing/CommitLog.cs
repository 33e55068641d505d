using System.Globalization;
using System.IO.Hashing;
using System.Text;
using System.Text.Json;

namespace ElasticMoE.Checkpointing;

/// <summary>A checkpoint that was committed: its step, directory (relative to the run directory), manifest hash and files.</summary>
/// <param name="Step">Steps completed when the state was taken.</param>
/// <param name="Directory">Its directory inside the run directory (<c>step-000123</c>, or <c>step-000123.2</c> for a later attempt at the same step).</param>
/// <param name="ManifestSha256">SHA-256 of its <c>manifest.json</c> as written: an edited manifest no longer matches.</param>
/// <param name="Files">Its data files (not the manifest).</param>
public sealed record CheckpointCommit(long Step, string Directory, string ManifestSha256, IReadOnlyList<string> Files);

/// <summary>What a commit log holds: the checkpoints committed and not retired, in commit order, and any lines it could not read.</summary>
public sealed record CommitLogContents(IReadOnlyList<CheckpointCommit> Committed, IReadOnlyList<string> Problems);

/// <summary>
/// The commit point of checkpoints. A checkpoint exists when, and only when, its commit is appended
/// here — after every one of its files, manifest last, is durable — so a crash at any point of a save
/// leaves either the previous set of checkpoints or that set plus the new one, never a half-written one
/// that counts. Retired checkpoints (deleted by retention) are recorded too, so that a missing
/// directory of a retired checkpoint is not mistaken for damage.
/// </summary>
/// <remarks>
/// The distributed runtime's commit point is an event in the coordinator's Akka.Persistence journal
/// ("checkpoint committed"); this interface is what the checkpoint layer needs of it, so the same
/// store, verification and fallback serve the journal and <see cref="FileCommitLog"/> alike.
/// </remarks>
public interface ICheckpointCommitLog
{
    /// <summary>Appends the commit durably; the checkpoint counts from the moment this returns.</summary>
    void AppendCommitted(CheckpointCommit commit);

    /// <summary>Records durably that a committed checkpoint is being deleted (before its files go).</summary>
    void AppendRetired(CheckpointCommit commit);

    /// <summary>The committed, not retired checkpoints in commit order, and problems met reading the log.</summary>
    CommitLogContents Read();
}

/// <summary>
/// <see cref="ICheckpointCommitLog"/> as an append-only text file (<c>commits.log</c> in the run
/// directory), for the single-process loop and tests: one line per record, <c>XXH64 JSON</c>, where
/// XXH64 is the 16-hex-digit XxHash64 of the JSON's UTF-8 bytes. Each append is one write followed by
/// fsync.
/// </summary>
/// <remarks>
/// A process killed during an append leaves an unterminated last line: that record was never
/// committed (the append had not returned) and is ignored silently, and the next append first cuts it
/// off so it cannot run into the new line. Any other line that fails its checksum is damage: it is
/// skipped (its checkpoint does not count, so loading falls back to an older one) and reported.
/// </remarks>
public sealed class FileCommitLog(string path) : ICheckpointCommitLog
{
    /// <summary>The log's file name in a run directory.</summary>
    public const string FileName = "commits.log";

    public string Path { get; } = System.IO.Path.GetFullPath(path);

    public void AppendCommitted(CheckpointCommit commit) => Append(Line("commit", commit));

    public void AppendRetired(CheckpointCommit commit) => Append(Line("retire", commit));

    public CommitLogContents Read()
    {
        var committed = new List<CheckpointCommit>();
        var problems = new List<string>();
        if (!File.Exists(Path)) return new CommitLogContents(committed, problems);
        var text = File.ReadAllBytes(Path);
        int start = 0, number = 0;
        while (start < text.Length)
        {
            int end = Array.IndexOf(text, (byte)'\n', start);
            number++;
            if (end < 0) break;   // a torn append: never committed
            var line = text.AsSpan(start, end - start);
            start = end + 1;
            if (Parse(line) is not { } record)
            {
                problems.Add($"{FileName} line {number} is damaged (checksum or syntax) and was skipped");
                continue;
            }
            if (record.Op == "commit") committed.Add(record.Commit);
            else committed.RemoveAll(c => c.Directory == record.Commit.Directory);
        }
        return new CommitLogContents(committed, problems);
    }

    private static byte[] Line(string op, CheckpointCommit c)
    {
        using var buffer = new MemoryStream();
        using (var w = new Utf8JsonWriter(buffer))
        {
            w.WriteStartObject();
            w.WriteString("op", op);
            w.WriteNumber("step", c.Step);
            w.WriteString("dir", c.Directory);
            w.WriteString("manifest_sha256", c.ManifestSha256);
            w.WriteStartArray("files");
            foreach (var f in c.Files) w.WriteStringValue(f);
            w.WriteEndArray();
            w.WriteEndObject();
        }
        var json = buffer.ToArray();
        var prefix = Encoding.ASCII.GetBytes(XxHash64.HashToUInt64(json).ToString("x16", CultureInfo.InvariantCulture) + " ");
        return [.. prefix, .. json, (byte)'\n'];
    }

    private static (string Op, CheckpointCommit Commit)? Parse(ReadOnlySpan<byte> line)
    {
        if (line.Length < 18 || line[16] != (byte)' ') return null;
        var json = line[17..];
        if (!ulong.TryParse(Encoding.ASCII.GetString(line[..16]), NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out var sum)
            || sum != XxHash64.HashToUInt64(json))
            return null;
        try
        {
            using var doc = JsonDocument.Parse(json.ToArray());
            var r = doc.RootElement;
            var op = r.GetProperty("op").GetString();
            if (op is not ("commit" or "retire")) return null;
            return (op, new CheckpointCommit(r.GetProperty("step").GetInt64(), r.GetProperty("dir").GetString()!,
                r.GetProperty("manifest_sha256").GetString()!, r.GetProperty("files").EnumerateArray().Select(f => f.GetString()!).ToList()));
        }
        catch (Exception e) when (e is JsonException or KeyNotFoundException or InvalidOperationException)
        {
            return null;
        }
    }

    private void Append(byte[] line)
    {
        var directory = System.IO.Path.GetDirectoryName(Path)!;
        Directory.CreateDirectory(directory);
        bool created = !File.Exists(Path);
        using (var file = new FileStream(Path, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.Read, bufferSize: 0))
        {
            // Cut off a torn last line (a killed append), so the new record starts on a line of its own.
            long keep = file.Length;
            if (keep > 0)
            {
                var one = new byte[1];
                while (keep > 0)
                {
                    file.Position = keep - 1;
                    file.ReadExactly(one);
                    if (one[0] == (byte)'\n') break;
                    keep--;
                }
                if (keep != file.Length) file.SetLength(keep);
            }
            file.Position = keep;
            file.Write(line);
            file.Flush(flushToDisk: true);
        }
        if (created) DurableFile.SyncDirectory(directory);
    }
}
