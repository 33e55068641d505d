using ElasticMoE.Cli;

namespace ElasticMoE.Tests.Cli;

public class ProgressTests
{
    private const char Escape = '\u001b';

    /// <summary>A clock the test moves: one second per report.</summary>
    private sealed class Clock
    {
        public TimeSpan Now;
        public TimeSpan Read() => Now;
    }

    private static string Drive(bool inPlace, bool colour, Action<Progress>? between = null)
    {
        var output = new StringWriter();
        var clock = new Clock();
        var p = new Progress(output, "work", 100, "B", inPlace, colour, clock.Read);
        for (int i = 0; i <= 100; i += 5)
        {
            p.Report(i);
            if (i == 50) between?.Invoke(p);
            clock.Now += TimeSpan.FromSeconds(1);
        }
        p.Done();
        return output.ToString();
    }

    [Fact]
    public void Output_that_is_not_a_terminal_gets_plain_lines_without_escape_codes()
    {
        var text = Drive(inPlace: false, colour: false);
        Assert.DoesNotContain(Escape, text);
        Assert.DoesNotContain('\r', text);
        var lines = text.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        // One line per tenth (0 % ... 100 %), not one per report.
        Assert.Equal(11, lines.Length);
        Assert.StartsWith("work:   0.0 %", lines[0]);
        Assert.Contains("50.0 % 50 B/100 B, 5 B/s, ETA 0:10", lines[5]);
        Assert.Contains("100.0 % 100 B/100 B", lines[^1]);

        // What commands use: a StringWriter (a pipe, a log) is never a terminal, whatever the environment.
        var writer = new StringWriter();
        Assert.False(Progress.OnTerminal(writer));
        using (var p = Progress.Start(writer, "x", 10, "steps"))
        {
            p.Report(3);
            p.Writer.WriteLine("a line");
            p.Done();
        }
        Assert.DoesNotContain(Escape, writer.ToString());
        Assert.Contains("a line", writer.ToString());
        var (console, observer, bar) = TrainingProgress.For(writer, 10, null);
        Assert.Same(writer, console);
        Assert.Null(observer);
        Assert.Null(bar);
    }

    [Fact]
    public void On_a_terminal_with_NO_COLOR_the_bar_is_redrawn_in_place_without_one_escape_code()
    {
        bool colour = TerminalColour.Enabled(isStdout: true, redirected: false, noColor: "1");
        Assert.False(colour);
        var text = Drive(inPlace: true, colour, p => p.Writer.WriteLine("step 50 done"));
        Assert.DoesNotContain(Escape, text);
        Assert.Contains('\r', text);
        Assert.Contains("[############............]", text);
        Assert.Contains("ETA", text);
        // The line printed meanwhile stands whole on its own line, and the bar comes back below it.
        Assert.Contains("\nstep 50 done\n", "\n" + text.Replace("\r", "\n"));
        Assert.EndsWith("\n", text);

        // Without NO_COLOR the same terminal gets a coloured bar: the test above would see escape codes if there were any.
        Assert.Contains(Escape, Drive(inPlace: true, colour: TerminalColour.Enabled(true, false, null)));
    }

    [Fact]
    public void Data_prepare_and_verify_through_the_CLI_into_a_pipe_carry_no_escape_codes()
    {
        var dir = TestSupport.TempDir();
        var file = Path.Combine(dir, "t.txt");
        File.WriteAllBytes(file, ElasticMoE.Data.DefaultCorpus.Generate(50_000));
        var (stdout, stderr) = (new StringWriter(), new StringWriter());
        Assert.Equal(0, Program.Run(["data", "prepare", "--out", Path.Combine(dir, "s"), "--shard-tokens", "10000", file], stdout, stderr));
        Assert.Equal(0, Program.Run(["data", "verify", Path.Combine(dir, "s")], stdout, stderr));
        var text = stdout.ToString() + stderr.ToString();
        Assert.DoesNotContain(Escape, text);
        Assert.Contains("data prepare: 100.0 %", text);
        Assert.Contains("data verify: 100.0 %", text);
        Assert.Contains("every SHA-256 matches", text);
    }
}
