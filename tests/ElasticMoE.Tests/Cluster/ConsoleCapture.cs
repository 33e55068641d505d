namespace ElasticMoE.Tests.Cluster;

/// <summary>
/// A console for the coordinator's report that a test can wait on: the test acts when the run says it
/// reached a point (a step, a pause), never after a guessed delay.
/// </summary>
public sealed class ConsoleCapture : StringWriter
{
    private readonly object _gate = new();

    public override void WriteLine(string? value)
    {
        lock (_gate) base.WriteLine(value);
    }

    public string Text
    {
        get { lock (_gate) return ToString(); }
    }

    public async Task WaitFor(string text, TimeSpan timeout)
    {
        var until = DateTime.UtcNow + timeout;
        while (!Text.Contains(text, StringComparison.Ordinal))
        {
            if (DateTime.UtcNow > until) throw new TimeoutException($"'{text}' never appeared in:\n{Text}");
            await Task.Delay(50);
        }
    }
}
