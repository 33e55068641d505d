using ElasticMoE.Configuration;
using ElasticMoE.State;

namespace ElasticMoE.Planning;

/// <summary>One unit sent from a worker that held it under the previous plan to one that needs it under the next.</summary>
public sealed record UnitTransfer(UnitId Unit, WorkerId From, WorkerId To)
{
    public override string ToString() => $"{Unit}: {From} -> {To}";
}

/// <summary>
/// What a re-plan costs in state: the units to send, and what each previous worker may free afterwards.
/// Drops are to be applied only once every move has landed, because a worker that drops a unit may be
/// the one sending it (a worker leaving the plan hands over everything it held, then frees it).
/// </summary>
/// <param name="Moves">Ordered by receiver, then unit: the same plans always give the same list.</param>
/// <param name="Drops">Per previous worker that holds something it no longer needs: those units, ascending.
/// Workers with nothing to drop have no entry, so an unchanged plan has no drops at all.</param>
public sealed record TransferPlan(IReadOnlyList<UnitTransfer> Moves, IReadOnlyDictionary<WorkerId, UnitId[]> Drops)
{
    /// <summary>True when the re-plan moves and frees nothing.</summary>
    public bool IsEmpty => Moves.Count == 0 && Drops.Count == 0;
}

/// <summary>
/// Units that the next plan needs but no surviving worker of the previous plan holds: the run cannot go on
/// from memory and must resume from a checkpoint.
/// </summary>
public sealed class UnitsLostException : Exception
{
    public UnitsLostException(IReadOnlyList<UnitId> units)
        : base($"{units.Count} unit(s) needed by the next plan have no holder left: {string.Join(", ", units)}")
        => Units = units;

    /// <summary>The lost units, ascending.</summary>
    public IReadOnlyList<UnitId> Units { get; }
}

/// <summary>
/// Turns two consecutive plans into transfers. Pure: it decides who sends what; the runtime does the sending.
/// </summary>
public static class TransferPlanner
{
    /// <summary>
    /// Moves and drops from <paramref name="previous"/> to <paramref name="next"/>, every previous worker
    /// still able to send (a planned change: scale down, scale up, new layout).
    /// </summary>
    /// <exception cref="UnitsLostException">A unit that <paramref name="next"/> needs has no holder in <paramref name="previous"/>.</exception>
    public static TransferPlan Between(TrainingPlan previous, TrainingPlan next, ModelOptions model)
        => Between(previous, next, model, Array.Empty<WorkerId>());

    /// <summary>
    /// As <see cref="Between(TrainingPlan, TrainingPlan, ModelOptions)"/>, when the workers in
    /// <paramref name="gone"/> died with their state: they neither send nor drop, and a unit whose only
    /// holders are gone is lost.
    /// </summary>
    /// <remarks>
    /// Each unit a worker of <paramref name="next"/> needs and did not hold comes from one previous holder:
    /// one on the receiver's node if there is one (no network hop), else the one with the fewest sends
    /// assigned so far (spreads the load when many receivers need the same replicated slice), then the
    /// lowest <see cref="WorkerId"/>.
    /// </remarks>
    /// <exception cref="UnitsLostException">A unit that <paramref name="next"/> needs has no live holder in <paramref name="previous"/>.</exception>
    public static TransferPlan Between(TrainingPlan previous, TrainingPlan next, ModelOptions model, IReadOnlyCollection<WorkerId> gone)
    {
        ArgumentNullException.ThrowIfNull(previous);
        ArgumentNullException.ThrowIfNull(next);
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(gone);
        var dead = gone.ToHashSet();
        foreach (var slot in next.Workers)
            if (dead.Contains(slot.Id))
                throw new ArgumentException($"worker {slot.Id} is gone but the next plan (epoch {next.Epoch}) uses it", nameof(gone));

        var held = Holdings(previous, model);
        var needed = Holdings(next, model);
        // unit → live previous holders, ascending by WorkerId
        var holders = new Dictionary<UnitId, List<WorkerId>>();
        foreach (var (worker, units) in held)
        {
            if (dead.Contains(worker)) continue;
            foreach (var u in units)
            {
                if (!holders.TryGetValue(u, out var list)) holders[u] = list = new List<WorkerId>();
                list.Add(worker);
            }
        }

        var sends = new Dictionary<WorkerId, int>();
        var moves = new List<UnitTransfer>();
        var lost = new SortedSet<UnitId>();
        foreach (var (receiver, units) in needed)          // SortedDictionary: receivers ascending
        {
            held.TryGetValue(receiver, out var had);
            foreach (var unit in units)                     // SortedSet: units ascending
            {
                if (had is not null && had.Contains(unit)) continue;
                if (!holders.TryGetValue(unit, out var candidates) || candidates.Count == 0) { lost.Add(unit); continue; }
                var from = Sender(candidates, receiver, sends);
                sends[from] = sends.GetValueOrDefault(from) + 1;
                moves.Add(new UnitTransfer(unit, from, receiver));
            }
        }
        if (lost.Count > 0) throw new UnitsLostException(lost.ToArray());

        var drops = new SortedDictionary<WorkerId, UnitId[]>();
        foreach (var (worker, units) in held)
        {
            if (dead.Contains(worker)) continue;
            var keep = needed.TryGetValue(worker, out var n) ? n : null;
            var freed = units.Where(u => keep is null || !keep.Contains(u)).ToArray();
            if (freed.Length > 0) drops[worker] = freed;
        }
        return new TransferPlan(moves, drops);
    }

    /// <summary>
    /// The holder to send a unit: one on the receiver's node first, then the fewest sends so far, then the lowest
    /// <see cref="WorkerId"/>. One pass rather than a sort per unit: with 1,024 data-parallel workers every dense
    /// unit has 1,024 holders, and a newcomer needs all of them.
    /// </summary>
    private static WorkerId Sender(List<WorkerId> candidates, WorkerId receiver, Dictionary<WorkerId, int> sends)
    {
        WorkerId? best = null;
        int bestRemote = 0, bestSends = 0;
        foreach (var c in candidates)
        {
            int remote = c.NodeAddress == receiver.NodeAddress ? 0 : 1, sent = sends.GetValueOrDefault(c);
            if (best is null || remote < bestRemote || (remote == bestRemote && (sent < bestSends || (sent == bestSends && c.CompareTo(best) < 0))))
                (best, bestRemote, bestSends) = (c, remote, sent);
        }
        return best!;
    }

    /// <summary>
    /// What each worker of <paramref name="plan"/> keeps current, by identity (ranks do not survive a
    /// re-plan): its units and the mirrors it keeps for its buddies. Mirrors are sources like any copy,
    /// and a next plan's mirrors are placed by moves like any unit.
    /// </summary>
    private static SortedDictionary<WorkerId, SortedSet<UnitId>> Holdings(TrainingPlan plan, ModelOptions model)
    {
        var result = new SortedDictionary<WorkerId, SortedSet<UnitId>>();
        var holdings = plan.HoldingsByRank(model);
        for (int r = 0; r < plan.WorldSize; r++)
        {
            var id = plan.Workers[r].Id;
            if (!result.TryGetValue(id, out var set)) result[id] = set = new SortedSet<UnitId>();
            set.UnionWith(holdings[r]);
        }
        return result;
    }
}
