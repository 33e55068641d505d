using ElasticMoE.Cli;
using Xunit.Abstractions;

namespace ElasticMoE.Tests.Checkpointing;

/// <summary>
/// Crash consistency with real processes: a child saving checkpoints as fast as it can is SIGKILLed at
/// random instants, 200 times; after every kill the newest valid checkpoint must be the newest
/// committed one, verify, and hold exactly that step's values. (<c>elasticmoe checkpoints crash-drill
/// --run-dir DIR --kills 1000</c> runs the same drill longer.)
/// </summary>
[Collection("cluster")]
public class CheckpointCrashTests(ITestOutputHelper output)
{
    [Fact]
    public void Two_hundred_sigkills_during_saves_always_leave_the_newest_committed_checkpoint_loadable()
    {
        var dir = Path.Combine(TestSupport.TempDir(), "run");
        // At least 200 kills, and as many more as it takes for 100 of them to land in the middle of a save.
        var result = CrashDrill.Run(dir, 200, new Random(20), new XunitWriter(output), midSaveKills: 100);
        output.WriteLine(result.ToString());
        Assert.InRange(result.Kills, 200, 800);
        Assert.True(result.MidSave >= 100, $"only {result.MidSave} kills interrupted a save: the drill does not test what it claims");
        Assert.True(result.NewestStep >= 20, $"the child committed only {result.NewestStep} checkpoints in 200 lives");
        // The bound is a guard against a hang, not a benchmark: ~35 s on an idle 2-core box, ~65 s under load
        // (and up to four times as many rounds when the load keeps kills from landing mid-save).
        Assert.True(result.Seconds < 600, $"{result.Seconds:F0} s");
    }

    private sealed class XunitWriter(ITestOutputHelper output) : StringWriter
    {
        public override void WriteLine(string? value) => output.WriteLine(value ?? "");
    }
}
