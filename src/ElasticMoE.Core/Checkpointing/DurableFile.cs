using System.Runtime.InteropServices;
using System.Security.Cryptography;

namespace ElasticMoE.Checkpointing;

/// <summary>
/// Writes a file so that after a crash at any instant its final name holds either nothing (or the
/// previous version) or the complete new content, never a prefix: content goes to a temporary name in
/// the same directory, is fsync'd, renamed over the final name, and the directory is fsync'd so the
/// rename itself is durable. A process killed half-way leaves only a <c>*.tmp</c> file, which nothing
/// reads and the next save removes.
/// </summary>
/// <remarks>
/// Why every step is needed: without the file fsync a power loss after the rename can leave the new
/// name pointing at unwritten blocks; without the directory fsync the rename may be lost while the
/// commit that depends on it is not. (A SIGKILL alone loses neither — the page cache survives the
/// process — but a checkpoint must survive the machine.)
/// </remarks>
public static class DurableFile
{
    /// <summary>The suffix of a file being written; never read as data.</summary>
    public const string TempSuffix = ".tmp";

    /// <summary>
    /// Writes <paramref name="path"/> atomically and durably from <paramref name="write"/>; returns the
    /// byte count and the SHA-256 (lower-case hex) of exactly what was written, computed on the way out
    /// so the file need not be read back.
    /// </summary>
    public static (long Bytes, string Sha256) Write(string path, Action<Stream> write)
    {
        ArgumentNullException.ThrowIfNull(write);
        var full = Path.GetFullPath(path);
        var directory = Path.GetDirectoryName(full)!;
        Directory.CreateDirectory(directory);
        var tmp = full + TempSuffix;
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        long bytes;
        using (var file = new FileStream(tmp, FileMode.Create, FileAccess.Write, FileShare.None, bufferSize: 1 << 16))
        {
            using (var hashing = new HashingStream(file, hash))
                write(hashing);
            file.Flush(flushToDisk: true);
            bytes = file.Length;
        }
        File.Move(tmp, full, overwrite: true);
        SyncDirectory(directory);
        return (bytes, Convert.ToHexStringLower(hash.GetHashAndReset()));
    }

    /// <summary>Lower-case hex SHA-256 of <paramref name="bytes"/>.</summary>
    public static string Sha256(ReadOnlySpan<byte> bytes) => Convert.ToHexStringLower(SHA256.HashData(bytes));

    /// <summary>
    /// fsync of a directory, so that a file created, renamed or removed in it stays so after a crash.
    /// .NET has no API for it (a directory cannot be opened as a FileStream), hence libc. A no-op on
    /// Windows, where NTFS journals renames and a directory cannot be flushed this way.
    /// </summary>
    public static void SyncDirectory(string directory)
    {
        if (OperatingSystem.IsWindows()) return;
        int fd = Native.open(directory, 0 /* O_RDONLY: enough for fsync of a directory on Linux and macOS */);
        if (fd < 0) throw new IOException($"cannot open directory {directory} to fsync it (errno {Marshal.GetLastPInvokeError()})");
        try
        {
            if (Native.fsync(fd) != 0) throw new IOException($"fsync of directory {directory} failed (errno {Marshal.GetLastPInvokeError()})");
        }
        finally
        {
            Native.close(fd);
        }
    }

    private static class Native
    {
        [DllImport("libc", SetLastError = true)]
        public static extern int open([MarshalAs(UnmanagedType.LPUTF8Str)] string path, int flags);

        [DllImport("libc", SetLastError = true)]
        public static extern int fsync(int fd);

        [DllImport("libc")]
        public static extern int close(int fd);
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
