using ElasticMoE.Cli;

namespace ElasticMoE.Tests.Cli;

public class TerminalColourTests
{
    [Fact]
    public void Colour_only_on_a_terminal_stdout_and_never_with_NO_COLOR()
    {
        Assert.True(TerminalColour.Enabled(isStdout: true, redirected: false, noColor: null));
        Assert.True(TerminalColour.Enabled(true, false, ""));
        Assert.False(TerminalColour.Enabled(true, redirected: true, null));   // a pipe or a file
        Assert.False(TerminalColour.Enabled(true, false, noColor: "1"));
        Assert.False(TerminalColour.Enabled(isStdout: false, false, null));  // a StringWriter, a log
        Assert.False(TerminalColour.Enabled(new StringWriter()));
    }
}
