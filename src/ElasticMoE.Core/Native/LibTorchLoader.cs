using System.Text;

namespace ElasticMoE.Native;

/// <summary>
/// Makes TorchSharp's native library loadable on the running machine, then initialises libtorch.
/// Call <see cref="EnsureLoaded"/> once at start-up, before any torch call.
/// </summary>
/// <remarks>
/// Why at start-up and not as a manual step: nothing installed by hand survives a fresh clone or a CI
/// machine, and the native files land in every project's bin folder (CLI, tests, benchmarks). Patching
/// the copy next to the running assembly covers each of them with one mechanism.
/// </remarks>
public static class LibTorchLoader
{
    private static readonly object Gate = new();
    private static bool _loaded;

    /// <summary>The versions weakened during this process's start-up (for diagnostics and tests).</summary>
    public static IReadOnlyList<string> PatchedVersions { get; private set; } = Array.Empty<string>();

    public static void EnsureLoaded()
    {
        lock (Gate)
        {
            if (_loaded) return;
            if (OperatingSystem.IsLinux())
            {
                PatchedVersions = PatchLibTorchSharp(AppContext.BaseDirectory);
                TuneMalloc();
                PinMklReproducibility();
            }
            try
            {
                // Any tensor op forces TorchSharp's static initialiser, which dlopens the native libraries.
                using var probe = TorchSharp.torch.zeros(1);
            }
            catch (Exception ex)
            {
                throw new InvalidOperationException(
                    "libtorch could not be loaded. Run `dotnet build` so the TorchSharp native files are next to the " +
                    $"executable, and check that {AppContext.BaseDirectory} is writable for the one-time GLIBCXX patch. " +
                    $"Cause: {ex.GetBaseException().Message}", ex);
            }
            _loaded = true;
        }
    }

    /// <summary>
    /// Keeps libtorch's large activation buffers inside malloc's heaps instead of a fresh mmap per tensor.
    /// </summary>
    /// <remarks>
    /// Why: glibc serves blocks above a (dynamic) threshold with mmap and returns them with munmap, so a
    /// training step that allocates the same few-MB tensors every micro-batch pays page faults for all of
    /// them — more so on threads other than the main one, whose arenas never raise that threshold, and
    /// the compute of a cluster runs on actor threads. A fixed 64 MB threshold and a high trim threshold
    /// keep those blocks for reuse. ELASTICMOE_MALLOC_TUNING=0 leaves malloc alone.
    /// </remarks>
    private static void TuneMalloc()
    {
        if (Environment.GetEnvironmentVariable("ELASTICMOE_MALLOC_TUNING") == "0") return;
        try
        {
            const int M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3;
            mallopt(M_MMAP_THRESHOLD, 64 << 20);
            mallopt(M_TRIM_THRESHOLD, 512 << 20);
        }
        catch (Exception ex) when (ex is DllNotFoundException or EntryPointNotFoundException)
        {
            // Not glibc (musl, say): nothing to tune.
        }
    }

    /// <summary>The MKL conditional-numerical-reproducibility mode set when the environment names none.</summary>
    public const string DefaultMklCbwr = "AVX2,STRICT";

    /// <summary>
    /// Makes MKL's GEMMs give the same bits whatever the thread count, and on any x86 CPU with AVX2, by setting
    /// MKL_CBWR=AVX2,STRICT in the native environment before libtorch (and its MKL) is loaded, unless the user set it.
    /// </summary>
    /// <remarks>
    /// Why: a node's gradients must not depend on its --threads (the canonical-reduction issue). Measured here:
    /// without it, the router's weight gradient ([experts, rows] x [rows, d], 6 x 128 x 128) differed in 141–160 of
    /// 768 elements between 1 and 2 threads — MKL split the 128-long inner sum over the threads — and a cluster of nodes
    /// at 2, 1 and 2 threads left the loop's bits at step 1. Strict CNR mode fixes MKL's order for ?gemm regardless of
    /// the thread count (Intel: "Strict CNR mode", AVX2 branch or newer); the AVX2 branch (not AVX-512) also makes an
    /// AVX2 machine and an AVX-512 one agree. Its cost is in docs/benchmarks.md. .NET's Environment.SetEnvironmentVariable
    /// does not reach the native environment that MKL reads, hence libc's setenv.
    /// </remarks>
    private static void PinMklReproducibility()
    {
        if (!string.IsNullOrEmpty(Environment.GetEnvironmentVariable("MKL_CBWR"))) return;
        try
        {
            setenv("MKL_CBWR", DefaultMklCbwr, 0);
            Environment.SetEnvironmentVariable("MKL_CBWR", DefaultMklCbwr);   // children started by this process inherit it
        }
        catch (Exception ex) when (ex is DllNotFoundException or EntryPointNotFoundException)
        {
        }
    }

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "setenv")]
    private static extern int setenv(string name, string value, int overwrite);

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "mallopt")]
    private static extern int mallopt(int param, int value);

    /// <summary>Weakens GLIBCXX version needs the system libstdc++ lacks, in every libLibTorchSharp.so under <paramref name="baseDir"/>.</summary>
    public static IReadOnlyList<string> PatchLibTorchSharp(string baseDir)
    {
        var candidates = new[]
        {
            Path.Combine(baseDir, "libLibTorchSharp.so"),
            Path.Combine(baseDir, "runtimes", "linux-x64", "native", "libLibTorchSharp.so"),
        }.Where(File.Exists).ToList();
        if (candidates.Count == 0) return Array.Empty<string>();

        var systemLib = FindSystemLibStdCxx();
        byte[]? systemBytes = systemLib is null ? null : File.ReadAllBytes(systemLib);
        var patched = new List<string>();
        foreach (var path in candidates)
        {
            var bytes = File.ReadAllBytes(path);
            var changed = ElfVersionPatcher.WeakenVersionNeeds(bytes, need =>
                need.Library.StartsWith("libstdc++", StringComparison.Ordinal) &&
                need.Version.StartsWith("GLIBCXX_", StringComparison.Ordinal) &&
                systemBytes is not null && !ContainsVersion(systemBytes, need.Version));
            if (changed.Count == 0) continue;

            // Write beside and rename, so a crash never leaves a half-written library behind. The temporary
            // name is this process's own: several processes started together after a fresh build all find
            // the library unpatched, and with one shared name all but the first failed their rename. Each
            // writes the same bytes, so whichever rename lands last leaves the same patched library.
            var tmp = $"{path}.patching.{Environment.ProcessId}";
            try
            {
                File.WriteAllBytes(tmp, bytes);
                File.Move(tmp, path, overwrite: true);
            }
            finally
            {
                if (File.Exists(tmp)) File.Delete(tmp);
            }
            patched.AddRange(changed);
        }
        return patched;
    }

    private static bool ContainsVersion(byte[] library, string version)
    {
        // The version definitions live in .dynstr as NUL-terminated strings; match the whole string.
        var needle = Encoding.ASCII.GetBytes(version + "\0");
        var span = library.AsSpan();
        int at;
        while ((at = span.IndexOf(needle)) >= 0)
        {
            if (at == 0 || span[at - 1] == 0) return true;
            span = span[(at + 1)..];
        }
        return false;
    }

    private static string? FindSystemLibStdCxx()
    {
        // Prefer the copy this process already mapped (the .NET host links it), else the usual places.
        try
        {
            foreach (var line in File.ReadLines("/proc/self/maps"))
            {
                int slash = line.IndexOf('/');
                if (slash >= 0 && line.Contains("libstdc++.so.6", StringComparison.Ordinal))
                    return line[slash..].Trim();
            }
        }
        catch (IOException) { }
        foreach (var dir in new[] { "/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib" })
        {
            var p = Path.Combine(dir, "libstdc++.so.6");
            if (File.Exists(p)) return p;
        }
        return null;
    }
}
