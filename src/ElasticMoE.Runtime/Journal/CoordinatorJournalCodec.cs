using System.Collections.Immutable;
using ElasticMoE.Planning;
using ElasticMoE.Runtime.Coordination;
using ElasticMoE.State;
using ElasticMoE.Training;

namespace ElasticMoE.Runtime.Journal;

/// <summary>
/// Maps coordinator events and state to their stored forms (the <c>*Wire</c> records) and back,
/// and names each stored form by a manifest. The manifest table is part of the format: a manifest is
/// never renamed or reused, and a new event type takes a new one.
/// </summary>
public static class CoordinatorJournalCodec
{
    private sealed record Entry(string Manifest, Type Domain, Type Wire, Func<object, object> ToWire, Func<object, object> ToDomain)
    {
        public static Entry Of<TDomain, TWire>(string manifest, Func<TDomain, TWire> toWire, Func<TWire, TDomain> toDomain)
            where TDomain : notnull where TWire : notnull
            => new(manifest, typeof(TDomain), typeof(TWire), d => toWire((TDomain)d), w => toDomain((TWire)w));
    }

    private static readonly Entry[] Entries =
    [
        Entry.Of<RunStarted, RunStartedWire>("j.RunStarted",
            e => new(e.RunFingerprint, e.Seed, e.StartStep),
            w => new(Required(w.RunFingerprint, "run fingerprint"), w.Seed, w.StartStep)),
        Entry.Of<NodeJoined, NodeJoinedWire>("j.NodeJoined",
            e => new(e.Address, e.SystemUid, e.Workers.Select(ToWire).ToArray()),
            w => new(Required(w.Address, "node address"), w.SystemUid, Array(w.Workers).Select(ToDomain).ToArray())),
        Entry.Of<NodeRemoved, NodeRemovedWire>("j.NodeRemoved",
            e => new(e.Address, e.SystemUid, e.Why),
            w => new(Required(w.Address, "node address"), w.SystemUid, w.Why ?? "")),
        Entry.Of<NodeLost, NodeLostWire>("j.NodeLost",
            e => new(e.Address, e.SystemUid, e.Why, e.AtStep),
            w => new(Required(w.Address, "node address"), w.SystemUid, w.Why ?? "", w.AtStep)),
        Entry.Of<PlanChanged, PlanChangedWire>("j.PlanChanged",
            e => new(ToWire(e.Plan), e.AtStep),
            w => new(ToDomain(Required(w.Plan, "plan")), w.AtStep)),
        Entry.Of<StepCommitted, StepCommittedWire>("j.StepCommitted",
            e => new(ToWire(e.Result), e.Attempts),
            w => new(ToDomain(Required(w.Result, "step result")), w.Attempts)),
        Entry.Of<CheckpointCommitted, CheckpointCommittedWire>("j.CheckpointCommitted", ToWire, ToDomain),
        Entry.Of<CheckpointRetired, CheckpointRetiredWire>("j.CheckpointRetired",
            e => new(e.Step, e.ManifestSha256),
            w => new(w.Step, Required(w.ManifestSha256, "manifest SHA-256"))),
        Entry.Of<RunResumed, RunResumedWire>("j.RunResumed", e => new(e.Step), w => new(w.Step)),
        Entry.Of<RolledBack, RolledBackWire>("j.RolledBack",
            e => new(e.FromStep, e.ToStep, e.LostUnits.ToArray()),
            w => new(w.FromStep, w.ToStep, Array(w.LostUnits))),
        Entry.Of<ExpertsRebalanced, ExpertsRebalancedWire>("j.ExpertsRebalanced",
            e => new(e.Step, e.MaxOverMeanBefore, e.MaxOverMeanAfter, e.CopiesMoved, e.Requested),
            w => new(w.Step, w.MaxOverMeanBefore, w.MaxOverMeanAfter, w.CopiesMoved, w.Requested)),
        Entry.Of<ShellCommandIssued, ShellCommandIssuedWire>("j.ShellCommandIssued", ToWire, ToDomain),
        Entry.Of<RunEnded, RunEndedWire>("j.RunEnded", e => new(e.NextStep, e.How), w => new(w.NextStep, w.How ?? "")),
        Entry.Of<CoordinatorRestarted, CoordinatorRestartedWire>("j.CoordinatorRestarted", e => new(e.AtStep), w => new(w.AtStep)),
        Entry.Of<WorkersAdopted, WorkersAdoptedWire>("j.WorkersAdopted",
            e => new(e.NextStep, ToWire(e.Plan)),
            w => new(w.NextStep, ToDomain(Required(w.Plan, "plan")))),
        Entry.Of<ExpertsMoved, ExpertsMovedWire>("j.ExpertsMoved",
            e => new(e.Epoch, e.Moves.Select(m => new UnitTransferWire(m.Unit.ToString(), ToWire(m.From), ToWire(m.To))).ToArray()),
            w => new(w.Epoch, Array(w.Moves).Select(m => new UnitTransfer(
                UnitId.Parse(Required(m.Unit, "unit")), ToDomain(Required(m.From, "move source")), ToDomain(Required(m.To, "move target")))).ToArray())),
        Entry.Of<CoordinatorState, CoordinatorStateWire>("j.CoordinatorState",
            s => new(s.RunFingerprint, s.NextStep, s.Workers.Select(ToWire).ToArray(), s.Plan is null ? null : ToWire(s.Plan),
                s.Committed.Select(ToWire).ToArray(), s.Checkpoints.Select(ToWire).ToArray())
            {
                Ended = s.Ended,
                ShellCommands = s.ShellCommands.Count == 0 ? null : s.ShellCommands.Select(ToWire).ToArray(),
            },
            w => new CoordinatorState(w.RunFingerprint, w.NextStep, Array(w.Workers).Select(ToDomain).ToImmutableList(),
                w.Plan is null ? null : ToDomain(w.Plan), Array(w.Committed).Select(ToDomain).ToImmutableList())
            {
                Checkpoints = Array(w.Checkpoints).Select(ToDomain).ToImmutableList(),
                Ended = w.Ended,
                ShellCommands = Array(w.ShellCommands).Select(ToDomain).ToImmutableList(),
            }),
    ];

    private static readonly Dictionary<Type, Entry> ByDomain = Entries.ToDictionary(e => e.Domain);
    private static readonly Dictionary<string, Entry> ByManifest = Entries.ToDictionary(e => e.Manifest, StringComparer.Ordinal);

    /// <summary>Every manifest the journal may hold, with the stored form it names.</summary>
    public static IReadOnlyDictionary<string, Type> WireTypes { get; } = Entries.ToDictionary(e => e.Manifest, e => e.Wire);

    /// <summary>True for the domain types this codec stores (every coordinator event, and the state).</summary>
    public static bool Handles(Type domain) => ByDomain.ContainsKey(domain);

    /// <exception cref="ArgumentException">The value is not a coordinator event or state.</exception>
    public static string ManifestOf(Type domain) => Find(domain).Manifest;

    /// <summary>The stored form of a coordinator event or of the coordinator state, and its manifest.</summary>
    public static (string Manifest, object Wire) ToWire(object domain)
    {
        var entry = Find(domain.GetType());
        return (entry.Manifest, entry.ToWire(domain));
    }

    /// <summary>The stored form a manifest names, or null for a manifest this version does not know.</summary>
    public static Type? WireTypeOf(string manifest) => ByManifest.TryGetValue(manifest, out var e) ? e.Wire : null;

    /// <summary>Maps a stored form back to its domain value.</summary>
    /// <exception cref="InvalidDataException">A field the value cannot do without is missing.</exception>
    public static object ToDomain(string manifest, object wire) =>
        ByManifest.TryGetValue(manifest, out var e) && e.Wire == wire.GetType()
            ? e.ToDomain(wire)
            : throw new ArgumentException($"'{manifest}' does not name a {wire.GetType().Name}");

    private static Entry Find(Type domain) => ByDomain.TryGetValue(domain, out var e)
        ? e
        : throw new ArgumentException($"{domain.FullName} has no stored form in the coordinator journal: add it to {nameof(CoordinatorJournalCodec)}");

    private static WorkerIdWire ToWire(WorkerId id) => new(id.NodeAddress, id.SystemUid, id.Device);

    private static WorkerId ToDomain(WorkerIdWire w) => new(Required(w.NodeAddress, "worker address"), w.SystemUid, w.Device);

    private static WorkerSlotWire ToWire(WorkerSlot s) => new(s.Id.NodeAddress, s.Id.SystemUid, s.Id.Device, s.DataEndpoint);

    private static WorkerSlot ToDomain(WorkerSlotWire w) =>
        new(new WorkerId(Required(w.NodeAddress, "worker address"), w.SystemUid, w.Device), w.DataEndpoint ?? "");

    private static TrainingPlanWire ToWire(TrainingPlan p) => new(
        p.Epoch, p.Dp, p.Pp,
        p.Stages.Select(s => s.First).ToArray(), p.Stages.Select(s => s.End).ToArray(),
        p.Workers.Select(ToWire).ToArray(),
        p.ExpertOwner.Select(o => o.ToArray()).ToArray(),
        p.Redundancy) { Copies = p.Copies, Keepers = p.Keepers?.Select(k => k.ToArray()).ToArray(), Domains = p.Domains?.ToArray() };

    private static TrainingPlan ToDomain(TrainingPlanWire w)
    {
        var starts = Array(w.StageStarts);
        var ends = Array(w.StageEnds);
        if (starts.Length != ends.Length)
            throw new InvalidDataException($"plan of epoch {w.Epoch} has {starts.Length} stage starts but {ends.Length} stage ends");
        var plan = new TrainingPlan(w.Epoch, w.Dp, w.Pp,
            starts.Zip(ends, (s, e) => new StageRange(s, e)).ToArray(),
            Array(w.Workers).Select(ToDomain).ToArray(),
            Array(w.ExpertOwner).Select(o => Array(o)).ToArray());
        if (w.Keepers is { } k && k.Length != plan.WorldSize || w.Domains is { } d && d.Length != plan.WorldSize)
            throw new InvalidDataException($"plan of epoch {w.Epoch} has {plan.WorldSize} workers but mirror keepers or domains for another number");
        return plan with
        {
            Redundancy = w.Redundancy, Copies = w.Copies is null ? null : Array(w.Copies).Select(l => Array(l).Select(c => Array(c)).ToArray()).ToArray(),
            Keepers = w.Keepers is null ? null : Array(w.Keepers).Select(k => Array(k)).ToArray(),
            Domains = w.Domains,
        };
    }

    private static StepResultWire ToWire(StepResult r) =>
        new(r.Step, r.Loss, r.Lr, r.GradNorm, r.MaxVio, r.ExpertCounts.Select(c => c.ToArray()).ToArray(), r.Tokens, r.Seconds);

    private static StepResult ToDomain(StepResultWire w) =>
        new(w.Step, w.Loss, w.Lr, w.GradNorm, w.MaxVio, Array(w.ExpertCounts).Select(c => Array(c)).ToArray(), w.Tokens, w.Seconds);

    private static CheckpointCommittedWire ToWire(CheckpointCommitted c) =>
        new(c.Step, c.ManifestSha256, c.Files.Select(f => new CheckpointFileWire(f.Path, f.Length, f.Sha256)).ToArray());

    private static CheckpointCommitted ToDomain(CheckpointCommittedWire w) =>
        new(w.Step, Required(w.ManifestSha256, "manifest SHA-256"),
            Array(w.Files).Select(f => new CheckpointFile(Required(f.Path, "file path"), f.Length, Required(f.Sha256, "file SHA-256"))).ToArray());

    private static ShellCommandIssuedWire ToWire(ShellCommandIssued c) => new(c.Step, c.Command, c.Args);

    private static ShellCommandIssued ToDomain(ShellCommandIssuedWire w) => new(w.Step, Required(w.Command, "shell command"), Array(w.Args));

    private static T Required<T>(T? value, string what) where T : class =>
        value ?? throw new InvalidDataException($"the stored coordinator record has no {what}");

    // An array key added after a journal was written reads as null there: it meant "none".
    private static T[] Array<T>(T[]? value) => value ?? [];

}
