using System.ComponentModel;
using System.Diagnostics;

namespace ElasticMoE.Tests.State;

/// <summary>
/// Finds a python3 that can import numpy, for tests that check our files with an independent reader.
/// Tried in order: <c>python3</c> on the PATH, then <c>/usr/bin/python3</c> (where Debian's
/// python3-numpy installs, when a pyenv python3 shadows it on the PATH).
/// </summary>
internal static class PythonNumpy
{
    private static readonly string[] Candidates = ["python3", "/usr/bin/python3"];
    private static readonly Lazy<string?> Found = new(Probe);

    /// <summary>The interpreter to run, or null when none has numpy.</summary>
    public static string? Interpreter => Found.Value;

    public static string SkipReason => $"no python3 with numpy (tried {string.Join(", ", Candidates)}; e.g. apt-get install -y python3-numpy)";

    /// <summary>Runs <paramref name="script"/> with <paramref name="arguments"/>; returns stdout, throws with stderr on a non-zero exit.</summary>
    public static string Run(string script, params string[] arguments)
    {
        var psi = new ProcessStartInfo(Interpreter ?? throw new InvalidOperationException(SkipReason))
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        psi.ArgumentList.Add("-c");
        psi.ArgumentList.Add(script);
        foreach (var a in arguments) psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        var stderr = p.StandardError.ReadToEndAsync();
        var stdout = p.StandardOutput.ReadToEnd();
        if (!p.WaitForExit(60_000))
        {
            p.Kill();
            throw new TimeoutException("python3 did not finish in 60 s");
        }
        if (p.ExitCode != 0) throw new InvalidOperationException($"python3 exited {p.ExitCode}: {stderr.Result}");
        return stdout;
    }

    private static string? Probe()
    {
        foreach (var candidate in Candidates)
        {
            try
            {
                var psi = new ProcessStartInfo(candidate) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
                psi.ArgumentList.Add("-c");
                psi.ArgumentList.Add("import numpy");
                using var p = Process.Start(psi);
                if (p is null) continue;
                p.StandardOutput.ReadToEnd();
                p.StandardError.ReadToEnd();
                if (p.WaitForExit(30_000) && p.ExitCode == 0) return candidate;
            }
            catch (Win32Exception)
            {
                // Not installed under that name: try the next.
            }
        }
        return null;
    }
}

/// <summary>A fact that xunit reports as skipped (not passed) when no python3 with numpy is available.</summary>
public sealed class PythonNumpyFactAttribute : FactAttribute
{
    public PythonNumpyFactAttribute()
    {
        if (PythonNumpy.Interpreter is null) Skip = PythonNumpy.SkipReason;
    }
}
