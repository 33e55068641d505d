namespace ElasticMoE.Cli;

/// <summary>Whether output may carry ANSI escape codes (colour, cursor movement).</summary>
/// <remarks>
/// Only on a terminal, and never when <c>NO_COLOR</c> is set to anything non-empty (no-color.org). Why decided here
/// and not left to Spectre.Console's detection: that looks at the terminal type, not at whether stdout is a pipe or
/// a file, so <c>elasticmoe shell ... | grep</c> received escape codes.
/// </remarks>
public static class TerminalColour
{
    /// <summary>For <paramref name="output"/> in this process: only the real stdout, not redirected, without NO_COLOR.</summary>
    public static bool Enabled(TextWriter output)
        => Enabled(ReferenceEquals(output, Console.Out), Console.IsOutputRedirected, Environment.GetEnvironmentVariable("NO_COLOR"));

    /// <summary>The rule itself, for tests.</summary>
    public static bool Enabled(bool isStdout, bool redirected, string? noColor)
        => isStdout && !redirected && string.IsNullOrEmpty(noColor);
}
