using Akka.Actor;
using ElasticMoE.Runtime.Coordination;
using ElasticMoE.Runtime.Journal;
using ElasticMoE.Runtime.Protocol;
using static ElasticMoE.Tests.Journal.JournalTestKit;

namespace ElasticMoE.Tests.Journal;

/// <summary>The events the journal actor keeps for the shell's <c>events</c>: as written, as replayed, filtered by step, described.</summary>
public sealed class JournalEventsTests : IDisposable
{
    private readonly TempRunDir _dir = new();

    public void Dispose() => _dir.Dispose();

    private sealed record SomeFutureEvent(string What, long AtStep) : ICoordinatorEvent;

    [Fact]
    public async Task The_journal_lists_every_event_but_step_commits_in_order_as_written_and_again_after_recovery()
    {
        var history = History();
        // Sequence numbers are 1-based positions in the history; AtStep is the steps committed before the event.
        var expected = history.Select((e, i) => (Seq: i + 1L, AtStep: Replay(history.Take(i)).NextStep, Event: e))
            .Where(x => x.Event is not StepCommitted).ToList();
        Assert.Contains(expected, x => x.AtStep > 0);

        var first = NewSystem(JournalConfig.Sqlite(_dir.Path));
        ShellEvents written;
        try
        {
            var (journal, _) = await Start(first, "run-events", snapshotEvery: 1000);
            await AppendAll(journal, history, batch: 2);
            written = await journal.Ask<ShellEvents>(new GetJournalEvents(0), Patience);
        }
        finally { await first.Terminate(); }
        Assert.Equal(history.Count, written.LastSequenceNr);
        Assert.Equal(1, written.Oldest);
        Assert.Equal(expected.Select(x => x.Seq), written.Events.Select(e => e.SequenceNr));
        Assert.Equal(expected.Select(x => x.AtStep), written.Events.Select(e => e.AtStep));
        Assert.Equal(expected.Select(x => x.Event.GetType().Name), written.Events.Select(e => e.Kind));
        Assert.Equal(expected.Select(x => CoordinatorEventText.Describe(x.Event)), written.Events.Select(e => e.Text));

        var second = NewSystem(JournalConfig.Sqlite(_dir.Path));
        try
        {
            var (journal, _) = await Start(second, "run-events", snapshotEvery: 1000);
            var replayed = await journal.Ask<ShellEvents>(new GetJournalEvents(0), Patience);
            Assert.Equal(written.Events, replayed.Events);
            long since = expected.First(x => x.AtStep > 0).AtStep;
            var later = await journal.Ask<ShellEvents>(new GetJournalEvents(since), Patience);
            Assert.Equal(expected.Where(x => x.AtStep >= since).Select(x => x.Seq), later.Events.Select(e => e.SequenceNr));
        }
        finally { await second.Terminate(); }
    }

    [Fact]
    public void Every_event_kind_is_described_and_an_unknown_one_by_its_own_text()
    {
        foreach (var e in History())
        {
            var text = CoordinatorEventText.Describe(e);
            Assert.False(string.IsNullOrWhiteSpace(text));
            Assert.DoesNotContain(e.GetType().Name + " {", text);   // a known kind gets its own words, not the record's dump
        }
        var future = new SomeFutureEvent("relayout to 4x1", 12);
        Assert.Equal("SomeFutureEvent", CoordinatorEventText.KindOf(future));
        Assert.Equal(future.ToString(), CoordinatorEventText.Describe(future));
        Assert.Contains("relayout to 4x1", CoordinatorEventText.Describe(future));
        var huge = new SomeFutureEvent(new string('x', 5000), 1);
        Assert.True(CoordinatorEventText.Describe(huge).Length <= 300);
    }
}
