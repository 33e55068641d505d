using System.Security.Cryptography;
using System.Text;
using TorchSharp;
using static TorchSharp.torch;

namespace ElasticMoE.Training;

/// <summary>Raised when a state file is unreadable: wrong magic, truncated, or failing its checksum.</summary>
public sealed class CorruptStateException(string message) : Exception(message);

/// <summary>
/// A flat, self-checking container of named tensors plus a few scalars: parameters, optimizer moments,
/// router biases and the step. Layout: magic, entries (name, dtype, shape, bytes), then a SHA-256 of all
/// that precedes it, so truncation or bit rot is detected before anything is loaded.
/// </summary>
public sealed class StateFile
{
    private static readonly byte[] Magic = "EMOESTATE1"u8.ToArray();

    public Dictionary<string, Tensor> Tensors { get; } = new(StringComparer.Ordinal);
    public Dictionary<string, string> Scalars { get; } = new(StringComparer.Ordinal);

    /// <summary>Writes to <c>path.tmp</c>, flushes to disk, then renames: a crash never leaves a half-written file at <paramref name="path"/>.</summary>
    public void Save(string path)
    {
        var dir = Path.GetDirectoryName(Path.GetFullPath(path))!;
        Directory.CreateDirectory(dir);
        var tmp = path + ".tmp";
        using (var fs = new FileStream(tmp, FileMode.Create, FileAccess.Write, FileShare.None))
        {
            using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
            using (var w = new BinaryWriter(new HashingStream(fs, hash), Encoding.UTF8, leaveOpen: true))
            {
                w.Write(Magic);
                w.Write(Scalars.Count);
                foreach (var (k, v) in Scalars.OrderBy(kv => kv.Key, StringComparer.Ordinal))
                {
                    w.Write(k);
                    w.Write(v);
                }
                w.Write(Tensors.Count);
                foreach (var (name, t) in Tensors.OrderBy(kv => kv.Key, StringComparer.Ordinal))
                {
                    using var c = t.detach().cpu().contiguous();
                    w.Write(name);
                    w.Write((int)c.dtype);
                    w.Write(c.dim());
                    foreach (var s in c.shape) w.Write(s);
                    var bytes = c.bytes;
                    w.Write((long)bytes.Length);
                    w.Write(bytes);
                }
            }
            fs.Write(hash.GetHashAndReset());
            fs.Flush(flushToDisk: true);
        }
        File.Move(tmp, path, overwrite: true);
    }

    public static StateFile Load(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"state file not found: {path}", path);
        var all = File.ReadAllBytes(path);
        if (all.Length < Magic.Length + 32 || !all.AsSpan(0, Magic.Length).SequenceEqual(Magic))
            throw new CorruptStateException($"{path}: not an ElasticMoE state file");
        var body = all.AsSpan(0, all.Length - 32);
        if (!SHA256.HashData(body).AsSpan().SequenceEqual(all.AsSpan(all.Length - 32)))
            throw new CorruptStateException($"{path}: checksum mismatch (truncated or corrupted)");

        var result = new StateFile();
        using var r = new BinaryReader(new MemoryStream(all, 0, all.Length - 32), Encoding.UTF8);
        r.ReadBytes(Magic.Length);
        int scalars = r.ReadInt32();
        for (int i = 0; i < scalars; i++) result.Scalars[r.ReadString()] = r.ReadString();
        int count = r.ReadInt32();
        for (int i = 0; i < count; i++)
        {
            var name = r.ReadString();
            var dtype = (ScalarType)r.ReadInt32();
            var shape = new long[r.ReadInt64()];
            for (int d = 0; d < shape.Length; d++) shape[d] = r.ReadInt64();
            var bytes = r.ReadBytes(checked((int)r.ReadInt64()));
            var t = empty(shape, dtype: dtype);
            t.bytes = bytes;
            result.Tensors[name] = t;
        }
        return result;
    }

    /// <summary>Passes writes through while feeding them to a hash.</summary>
    private sealed class HashingStream(Stream inner, IncrementalHash hash) : Stream
    {
        public override void Write(byte[] buffer, int offset, int count) => Write(buffer.AsSpan(offset, count));
        public override void Write(ReadOnlySpan<byte> buffer)
        {
            hash.AppendData(buffer);
            inner.Write(buffer);
        }
        public override void Flush() => inner.Flush();
        public override bool CanRead => false;
        public override bool CanSeek => false;
        public override bool CanWrite => true;
        public override long Length => throw new NotSupportedException();
        public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }
        public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException();
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
    }
}
