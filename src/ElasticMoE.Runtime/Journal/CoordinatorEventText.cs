using System.Globalization;
using ElasticMoE.Runtime.Coordination;

namespace ElasticMoE.Runtime.Journal;

/// <summary>
/// One line of text for a journaled <see cref="ICoordinatorEvent"/> (<c>events</c> in the shell). Every event
/// kind is described: the known ones by what matters in them, any other (an event type added later) by its
/// record's own text, so a new kind shows up without a change here.
/// </summary>
public static class CoordinatorEventText
{
    private const int MaxLength = 300;

    /// <summary>The event's kind: its type's name (NodeJoined, PlanChanged, ...).</summary>
    public static string KindOf(ICoordinatorEvent e) => e.GetType().Name;

    public static string Describe(ICoordinatorEvent e)
    {
        var text = e switch
        {
            RunStarted r => Inv($"run started at step {r.StartStep} (seed {r.Seed})"),
            NodeJoined j => Inv($"node {j.Address} joined with {j.Workers.Count} worker(s)"),
            NodeRemoved r => Inv($"node {r.Address} removed: {r.Why}"),
            NodeLost l => Inv($"node {l.Address} lost at step {l.AtStep}: {l.Why}"),
            CheckpointCommitted c => Inv($"checkpoint of step {c.Step} committed: {c.Files.Count} file(s), {c.Files.Sum(f => f.Length)} bytes, manifest {Short(c.ManifestSha256)}"),
            CheckpointRetired r => Inv($"checkpoint of step {r.Step} retired (manifest {Short(r.ManifestSha256)})"),
            ExpertsMoved m => Inv($"{m.Moves.Count} unit(s) moved for plan {m.Epoch}"),
            PlanChanged p => Inv($"plan {p.Plan.Epoch} from step {p.AtStep}: {p.Plan.WorldSize} worker(s), DP {p.Plan.Dp} x PP {p.Plan.Pp}"),
            RunResumed r => Inv($"run resumed from the checkpoint of step {r.Step}"),
            RolledBack r => Inv($"rolled back in place before step {r.FromStep + 1} to the checkpoint of step {r.ToStep}: {r.LostUnits.Count} unit(s) had no copy left ({string.Join(", ", r.LostUnits.Take(4))}{(r.LostUnits.Count > 4 ? ", ..." : "")})"),
            CoordinatorRestarted r => Inv($"coordinator restarted at step {r.AtStep}"),
            WorkersAdopted a => Inv($"workers' units adopted at step {a.NextStep} under plan {a.Plan.Epoch}"),
            RunEnded r => Inv($"run ended before step {r.NextStep}: {r.How}"),
            ExpertsRebalanced r => Inv($"experts rebalanced before step {r.Step}{(r.Requested ? " (requested)" : "")}: max/mean {r.MaxOverMeanBefore:F3} -> {r.MaxOverMeanAfter:F3}, {r.CopiesMoved} cop(ies) moved"),
            StepCommitted s => Inv($"step {s.Result.Step + 1} committed, loss {s.Result.Loss:F4}, {s.Attempts} attempt(s)"),
            _ => e.ToString() ?? KindOf(e),
        };
        return text.Length <= MaxLength ? text : text[..(MaxLength - 3)] + "...";
    }

    private static string Inv(FormattableString s) => s.ToString(CultureInfo.InvariantCulture);

    private static string Short(string sha) => sha.Length > 12 ? sha[..12] : sha;
}
