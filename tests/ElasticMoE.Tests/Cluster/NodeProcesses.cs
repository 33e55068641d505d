using System.Diagnostics;

namespace ElasticMoE.Tests.Cluster;

/// <summary>`elasticmoe` OS processes for the multi-process tests: a start, a finish with a deadline (ports: LoopbackPorts).</summary>
internal static class NodeProcesses
{
    public static Process Start(params string[] args)
    {
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        psi.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "elasticmoe.dll"));
        foreach (var a in args) psi.ArgumentList.Add(a);
        return Process.Start(psi)!;
    }

    public static async Task<(int Code, string Out)> Finish(Process p, TimeSpan timeout)
    {
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        using var cts = new CancellationTokenSource(timeout);
        try { await p.WaitForExitAsync(cts.Token); }
        catch (OperationCanceledException) { p.Kill(entireProcessTree: true); }
        return (p.HasExited ? p.ExitCode : -1, await stdout + await stderr);
    }
}
