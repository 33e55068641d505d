using System.Runtime.InteropServices;

namespace ElasticMoE.Native;

/// <summary>Native libraries this process has already mapped (libtorch's own dependencies), found by file name.</summary>
internal static class LoadedLibrary
{
    /// <summary>A handle to the first mapped library whose file name starts with <paramref name="prefix"/>, or zero.</summary>
    public static IntPtr Open(string prefix)
    {
        if (!OperatingSystem.IsLinux()) return IntPtr.Zero;
        LibTorchLoader.EnsureLoaded();
        try
        {
            var path = File.ReadLines("/proc/self/maps")
                .Select(line => line.Split(' ', StringSplitOptions.RemoveEmptyEntries))
                .Where(f => f.Length >= 6 && Path.GetFileName(f[5]).StartsWith(prefix, StringComparison.Ordinal))
                .Select(f => f[5]).FirstOrDefault();
            return path is not null && NativeLibrary.TryLoad(path, out var lib) ? lib : IntPtr.Zero;
        }
        catch (IOException)
        {
            return IntPtr.Zero; // no /proc
        }
    }
}
