using ElasticMoE.Configuration;
using ElasticMoE.State;

namespace ElasticMoE.Planning;

/// <summary>
/// The stable identity of a worker: node address + actor-system uid + device. A node that comes back on
/// the same address is a new incarnation (new uid), so it is a different worker. Never a position in a list.
/// </summary>
public sealed record WorkerId(string NodeAddress, long SystemUid, int Device) : IComparable<WorkerId>
{
    public int CompareTo(WorkerId? other)
    {
        if (other is null) return 1;
        int c = string.CompareOrdinal(NodeAddress, other.NodeAddress);
        if (c != 0) return c;
        c = SystemUid.CompareTo(other.SystemUid);
        return c != 0 ? c : Device.CompareTo(other.Device);
    }

    public override string ToString() => $"{NodeAddress}#{SystemUid}/d{Device}";
}

/// <summary>One device that can host work: its identity and where its data plane listens.</summary>
public sealed record WorkerSlot(WorkerId Id, string DataEndpoint)
{
    public string NodeAddress => Id.NodeAddress;
    public int Device => Id.Device;
}

/// <summary>Blocks [First, End) of the model, run by one pipeline stage.</summary>
public sealed record StageRange(int First, int End)
{
    public bool Contains(int block) => block >= First && block < End;
}

/// <summary>
/// Who computes what: the data-parallel × pipeline-parallel layout and where every routed expert lives.
/// A value: the coordinator can replace it at any step boundary (elasticity, rebalancing) and send the
/// new one out; nothing in it refers to actors or sockets. A worker's position in <see cref="Workers"/>
/// (its rank, replica·Pp + stage) is local to this plan and names it only inside this epoch's tags;
/// across plans a worker is its <see cref="WorkerId"/>.
/// </summary>
/// <param name="Epoch">Generation of the plan; bumps whenever the plan changes, and scopes data-plane tags.</param>
/// <param name="Stages">Block range of each pipeline stage (Pp entries).</param>
/// <param name="ExpertOwner">[moe layer ordinal][expert] → worker index hosting that expert (its first copy when <see cref="Copies"/> replicates it).</param>
public sealed record TrainingPlan(int Epoch, int Dp, int Pp, IReadOnlyList<StageRange> Stages, IReadOnlyList<WorkerSlot> Workers, int[][] ExpertOwner)
{
    public int WorldSize => Workers.Count;

    /// <summary>Rank of a worker in this plan, or -1 when the plan does not use it.</summary>
    public int RankOf(WorkerId id)
    {
        for (int i = 0; i < Workers.Count; i++) if (Workers[i].Id == id) return i;
        return -1;
    }

    // ---- replicated experts ---------------------------------------------------------------------

    /// <summary>
    /// [moe layer ordinal][expert] → ranks holding a copy of that expert, in copy order (copy i takes the
    /// i-th of r contiguous shares of the step's micro-batches, see <see cref="CopyFor"/>); null = one copy of every
    /// expert, on its <see cref="ExpertOwner"/>. When set, <c>Copies[o][e][0] == ExpertOwner[o][e]</c>: code
    /// that only needs "a holder" keeps reading the owner table. Copies of one expert are bit-identical:
    /// their holders combine their partial gradients in the canonical tree before every update.
    /// </summary>
    public int[][][]? Copies { get; init; }

    /// <summary>Ranks holding a copy of the expert, in copy order (at least one: the owner).</summary>
    public int[] CopiesOf(int moeOrdinal, int expert) => Copies?[moeOrdinal][expert] ?? [ExpertOwner[moeOrdinal][expert]];

    /// <summary>True when some expert of the layer has more than one copy.</summary>
    public bool IsReplicated(int moeOrdinal) => Copies is { } c && c[moeOrdinal].Any(h => h.Length > 1);

    /// <summary>
    /// Which copy (of <paramref name="copies"/>) computes an expert's rows of micro-batch <paramref name="microBatch"/>
    /// (of <paramref name="microBatches"/>): copy i takes the i-th contiguous share of the micro-batches
    /// (<c>BatchAssignment.MicroBatchesFor(i, copies, microBatches)</c>), all of their rows.
    /// </summary>
    /// <remarks>
    /// Why whole micro-batches and not a share of every micro-batch's rows: a share's gradient is a partial sum that
    /// no other layout computes, while a micro-batch's gradient is the same bits on any worker, and the copies'
    /// partials over contiguous shares are nodes of the canonical tree (<c>ReductionTree</c>), so summing them
    /// gives the single copy's bits. Over a step the copies still split the expert's load.
    /// </remarks>
    public static int CopyFor(int microBatch, int copies, int microBatches)
    {
        if ((uint)microBatch >= (uint)microBatches) throw new ArgumentOutOfRangeException(nameof(microBatch), microBatch, $"micro-batches are 0..{microBatches - 1}");
        for (int i = 0; i < copies; i++)
        {
            var (lo, hi) = CopyMicroBatches(i, copies, microBatches);
            if (microBatch >= lo && microBatch < hi) return i;
        }
        throw new InvalidOperationException("unreachable: the copies' shares partition the micro-batches");
    }

    /// <summary>The micro-batches [lo, hi) copy <paramref name="copy"/> of <paramref name="copies"/> computes (see <see cref="CopyFor"/>).</summary>
    public static (int Lo, int Hi) CopyMicroBatches(int copy, int copies, int microBatches)
        => Data.BatchAssignment.RangeFor(copy, copies, microBatches);

    /// <summary>
    /// This plan with its experts where <paramref name="placement"/> puts them (workers matched by identity;
    /// every holder must be a worker of this plan). Copies keep the placement's order; an expert with one
    /// copy is as an <see cref="ExpertOwner"/> entry, and a placement without replicas leaves <see cref="Copies"/> null.
    /// </summary>
    public TrainingPlan WithPlacement(ExpertPlacement placement)
    {
        if (placement.Layers != ExpertOwner.Length)
            throw new ArgumentException($"the placement has {placement.Layers} MoE layers, the plan {ExpertOwner.Length}", nameof(placement));
        var copies = new int[placement.Layers][][];
        for (int o = 0; o < placement.Layers; o++)
        {
            copies[o] = new int[placement.ExpertCount(o)][];
            for (int e = 0; e < copies[o].Length; e++)
                copies[o][e] = placement.CopiesOf(o, e).Select(w => RankOf(w) is var r and >= 0 ? r
                    : throw new ArgumentException($"layer {o} expert {e} is placed on {w}, which is not a worker of plan {Epoch}", nameof(placement))).ToArray();
        }
        var owner = copies.Select(layer => layer.Select(c => c[0]).ToArray()).ToArray();
        bool replicated = copies.Any(layer => layer.Any(c => c.Length > 1));
        return this with { ExpertOwner = owner, Copies = replicated ? copies : null };
    }

    /// <summary>Units held by the worker of rank <paramref name="rank"/>: its stage's slice and the expert copies it hosts.</summary>
    public IEnumerable<UnitId> UnitsOf(int rank, ModelOptions model)
    {
        var stage = Stages[StageOf(rank)];
        foreach (var u in UnitCatalog.StageUnits(model, stage.First, stage.End)) yield return u;
        for (int o = 0; o < ExpertOwner.Length; o++)
            for (int e = 0; e < ExpertOwner[o].Length; e++)
                if (Array.IndexOf(CopiesOf(o, e), rank) >= 0) yield return UnitId.OfExpert(o + model.DenseLayers, e);
    }

    /// <summary>Every unit with the ranks that hold it (several for dense units when DP &gt; 1).</summary>
    public IReadOnlyDictionary<UnitId, int[]> Holders(ModelOptions model)
    {
        var map = new SortedDictionary<UnitId, List<int>>();
        for (int r = 0; r < WorldSize; r++)
            foreach (var u in UnitsOf(r, model))
            {
                if (!map.TryGetValue(u, out var list)) map[u] = list = new List<int>();
                list.Add(r);
            }
        return map.ToDictionary(kv => kv.Key, kv => kv.Value.ToArray());
    }
    /// <summary>
    /// True when <paramref name="other"/> lays out the same workers in the same ranks with the same stages and
    /// expert owners, whatever its epoch: record equality compares the lists by reference, and a coordinator
    /// needs to know whether a re-plan changes anything before it pays for one.
    /// </summary>
    public bool SameLayout(TrainingPlan other)
        => Dp == other.Dp && Pp == other.Pp
           && Stages.SequenceEqual(other.Stages)
           && Workers.SequenceEqual(other.Workers) && Redundancy == other.Redundancy
           && Enumerable.Range(0, WorldSize).All(r => DomainOf(r) == other.DomainOf(r) && MirrorKeepersOf(r).SequenceEqual(other.MirrorKeepersOf(r)))
           && ExpertOwner.Length == other.ExpertOwner.Length
           && ExpertOwner.Zip(other.ExpertOwner).All(t => t.First.SequenceEqual(t.Second))
           && Enumerable.Range(0, ExpertOwner.Length).All(o => Enumerable.Range(0, ExpertOwner[o].Length)
               .All(e => CopiesOf(o, e).SequenceEqual(other.CopiesOf(o, e))));

    // ---- redundancy: mirrors across nodes and failure domains ------------------------------------

    /// <summary>
    /// Mirrors kept of every unit whose copies are not yet on r + 1 nodes (<c>cluster.redundancy</c> = r): 0 = none;
    /// r = each such unit also lives on the r mirror keepers of its holder (<see cref="MirrorKeepersOf"/>), on r
    /// other nodes, kept at the same step as the unit itself, so losing any r nodes at once loses no state.
    /// Part of the plan because who mirrors what follows from it.
    /// </summary>
    public int Redundancy { get; init; }

    /// <summary>
    /// Failure domain of each rank (<c>cluster.failure-domain</c>: a rack, a zone), in rank order; null = every
    /// node is a domain of its own. Copies of a unit go to distinct domains when there are enough of them.
    /// </summary>
    public IReadOnlyList<string>? Domains { get; init; }

    /// <summary>The failure domain of <paramref name="rank"/>'s node (its address when the plan names none).</summary>
    public string DomainOf(int rank) => Domains?[rank] ?? Workers[rank].NodeAddress;

    /// <summary>
    /// [rank] → the ranks that mirror it, in keeper order, as <see cref="MirrorPlanner"/> chose them (keeping
    /// the previous plan's keepers where still valid); null = <see cref="MirrorPlanner.Keepers"/> of this plan
    /// alone (no previous plan: for one mirror, the next rank cyclically on another node).
    /// </summary>
    public int[][]? Keepers { get; init; }

    /// <summary>
    /// The workers that mirror <paramref name="rank"/>'s units: up to <see cref="Redundancy"/> ranks, each on
    /// a node of its own other than <paramref name="rank"/>'s; fewer when the plan has fewer other nodes
    /// (<see cref="BelowRedundancy"/>), none without redundancy.
    /// </summary>
    public int[] MirrorKeepersOf(int rank)
        => Redundancy <= 0 ? [] : Keepers is { } k ? k[rank] : MirrorPlanner.Keepers(this, null)[rank];

    /// <summary>
    /// The first of <paramref name="rank"/>'s mirror keepers; -1 without redundancy or when every worker is on
    /// one node (nothing to protect against).
    /// </summary>
    public int BuddyOf(int rank) => MirrorKeepersOf(rank) is [var first, ..] ? first : -1;

    /// <summary>Nodes in the plan.</summary>
    public int NodeCount => Workers.Select(w => w.NodeAddress).Distinct().Count();

    /// <summary>Failure domains in the plan.</summary>
    public int DomainCount => Enumerable.Range(0, WorldSize).Select(DomainOf).Distinct().Count();

    /// <summary>
    /// How many nodes may vanish at once without losing state under this plan: <see cref="Redundancy"/>, or
    /// less when the plan has fewer than r + 1 nodes (then the run is below its redundancy).
    /// </summary>
    public int EffectiveRedundancy => Math.Min(Redundancy, NodeCount - 1);

    /// <summary>True when the plan cannot give every unit r + 1 copies on distinct nodes (too few nodes).</summary>
    public bool BelowRedundancy => EffectiveRedundancy < Redundancy;

    /// <summary>
    /// Units of <paramref name="rank"/> that its keepers mirror: those whose holders are on fewer than r + 1
    /// nodes, or on fewer domains than the plan can give them (min(r + 1, domains)). A unit held by several
    /// workers is mirrored once, by the lowest of their ranks. For r = 1 without domains: the units no worker
    /// of another node holds.
    /// </summary>
    public IEnumerable<UnitId> MirroredUnitsOf(int rank, ModelOptions model)
    {
        if (BuddyOf(rank) < 0) yield break;
        var holders = Holders(model);
        int wantDomains = Math.Min(Redundancy + 1, DomainCount);
        foreach (var u in UnitsOf(rank, model))
        {
            var h = holders[u];
            if (h.Min() != rank) continue;
            bool covered = h.Select(r => Workers[r].NodeAddress).Distinct().Count() >= Redundancy + 1
                           && h.Select(DomainOf).Distinct().Count() >= wantDomains;
            if (!covered) yield return u;
        }
    }

    /// <summary>Mirrors <paramref name="rank"/> keeps for others: (unit, the rank it mirrors), ascending by unit.</summary>
    public IEnumerable<(UnitId Unit, int Source)> MirrorsHeldBy(int rank, ModelOptions model)
    {
        if (Redundancy <= 0) return [];
        var result = new List<(UnitId, int)>();
        for (int r = 0; r < WorldSize; r++)
            if (r != rank && Array.IndexOf(MirrorKeepersOf(r), rank) >= 0)
                result.AddRange(MirroredUnitsOf(r, model).Select(u => (u, r)));
        return result.OrderBy(t => t.Item1);
    }

    /// <summary>Every unit whose current state <paramref name="rank"/> keeps: its own and its mirrors.</summary>
    public IEnumerable<UnitId> HoldingsOf(int rank, ModelOptions model)
        => UnitsOf(rank, model).Concat(MirrorsHeldBy(rank, model).Select(m => m.Unit)).Distinct();

    /// <summary>
    /// <see cref="HoldingsOf"/> of every rank at once, the same units in the same order: what a planner that needs every
    /// worker's holdings (<see cref="TransferPlanner"/>, <see cref="Reattachment"/>) calls.
    /// </summary>
    /// <remarks>
    /// Why a second path: <see cref="HoldingsOf"/> rebuilds the plan's whole unit → holders map for the rank it mirrors, and
    /// scans every expert for the rank's copies, so calling it for each rank costs W² x units: 2.3 s for one transfer plan at
    /// 64 workers x 64 experts x 8 MoE layers, hours at 1,024 x 256 x 60. Here the holders map, the buddies and each
    /// rank's units are built once (W x units). A test checks it against <see cref="HoldingsOf"/> rank by rank.
    /// </remarks>
    public UnitId[][] HoldingsByRank(ModelOptions model)
    {
        int w = WorldSize;
        var stageUnits = Stages.Select(st => UnitCatalog.StageUnits(model, st.First, st.End).ToArray()).ToArray();
        // Each rank's units in UnitsOf's order: its stage's slice, then its expert copies by (layer, expert) ascending.
        var units = new List<UnitId>[w];
        for (int r = 0; r < w; r++) units[r] = new List<UnitId>(stageUnits[StageOf(r)]);
        for (int o = 0; o < ExpertOwner.Length; o++)
            for (int e = 0; e < ExpertOwner[o].Length; e++)
            {
                var copies = CopiesOf(o, e);
                for (int i = 0; i < copies.Length; i++)
                    if (Array.IndexOf(copies, copies[i]) == i) units[copies[i]].Add(UnitId.OfExpert(o + model.DenseLayers, e));
            }
        var result = new UnitId[w][];
        if (Redundancy <= 0)
        {
            for (int r = 0; r < w; r++) result[r] = units[r].Distinct().ToArray();
            return result;
        }

        // Per unit what MirroredUnitsOf asks of its holders: the nodes and domains they cover, and the lowest rank (ranks come ascending).
        int wantDomains = Math.Min(Redundancy + 1, DomainCount);
        var holders = new Dictionary<UnitId, (HashSet<string> Nodes, HashSet<string> Domains, int Lowest)>();
        for (int r = 0; r < w; r++)
            foreach (var u in units[r])
            {
                if (!holders.TryGetValue(u, out var h)) holders[u] = h = (new HashSet<string>(StringComparer.Ordinal), new HashSet<string>(StringComparer.Ordinal), r);
                h.Nodes.Add(Workers[r].NodeAddress);
                h.Domains.Add(DomainOf(r));
            }
        // Mirrors each rank keeps, from the sources ascending (MirrorsHeldBy's order before its sort by unit): every keeper of a source.
        var keepers = Keepers ?? MirrorPlanner.Keepers(this, null);
        var mirrors = Enumerable.Range(0, w).Select(_ => new List<(UnitId Unit, int Source)>()).ToArray();
        for (int r = 0; r < w; r++)
        {
            if (keepers[r].Length == 0) continue;
            foreach (var u in units[r])
            {
                var h = holders[u];
                if (h.Lowest != r || (h.Nodes.Count >= Redundancy + 1 && h.Domains.Count >= wantDomains)) continue;
                foreach (int k in keepers[r])
                    if (k != r) mirrors[k].Add((u, r));
            }
        }
        for (int r = 0; r < w; r++)
            result[r] = units[r].Concat(mirrors[r].OrderBy(t => t.Unit).Select(t => t.Unit)).Distinct().ToArray();
        return result;
    }

    public int StageOf(int worker) => worker % Pp;
    public int ReplicaOf(int worker) => worker / Pp;
    public int WorkerAt(int replica, int stage) => replica * Pp + stage;
    public int StageOfBlock(int block) => Stages.Select((s, i) => (s, i)).First(t => t.s.Contains(block)).i;

    /// <summary>Workers of one stage across all replicas: the group that all-reduces that stage's dense gradients.</summary>
    public int[] StageGroup(int stage) => Enumerable.Range(0, Dp).Select(d => WorkerAt(d, stage)).ToArray();

    /// <summary>Experts of MoE layer <paramref name="moeOrdinal"/> hosted by <paramref name="worker"/>, ascending.</summary>
    public int[] ExpertsOn(int moeOrdinal, int worker)
        => Enumerable.Range(0, ExpertOwner[moeOrdinal].Length).Where(e => Array.IndexOf(CopiesOf(moeOrdinal, e), worker) >= 0).ToArray();

    /// <summary>
    /// True when only <paramref name="worker"/> ever sends tokens to its own experts of this layer: then the
    /// experts can run inside that worker's autograd graph with no request/reply at all. Never for a layer
    /// with replicated experts: their copies exchange gradients shard to shard, so they live in shards.
    /// </summary>
    public bool ExpertsPrivateTo(int moeOrdinal, int worker, int block)
        => Dp == 1 && StageOf(worker) == StageOfBlock(block) && !IsReplicated(moeOrdinal);

    /// <summary>
    /// <see cref="ExpertsPrivateTo"/> for the shard of MoE layer <paramref name="moeOrdinal"/> on
    /// <paramref name="worker"/> (MoE layers follow the model's <paramref name="denseLayers"/> dense blocks):
    /// such a shard's experts run in its worker's stage graph, and that stage reports their gradient norm.
    /// </summary>
    public bool ShardIsPrivate(int moeOrdinal, int worker, int denseLayers)
        => ExpertsPrivateTo(moeOrdinal, worker, moeOrdinal + denseLayers);
}

/// <summary>Pure layout maths: how to split layers into stages and spread experts over workers.</summary>
public static class LayoutPlanner
{
    /// <summary>
    /// A plan for <paramref name="workers"/> with pipeline degree <paramref name="pp"/> (which must divide
    /// the worker count); the data-parallel degree is what remains.
    /// </summary>
    public static TrainingPlan Plan(int epoch, IReadOnlyList<WorkerSlot> workers, int pp, ModelOptions model)
    {
        if (workers.Count == 0) throw new ArgumentException("a plan needs at least one worker");
        if (pp <= 0 || workers.Count % pp != 0)
            throw new ArgumentException($"pipeline degree {pp} must divide the number of workers ({workers.Count})");
        if (pp > model.Layers)
            throw new ArgumentException($"pipeline degree {pp} exceeds the number of layers ({model.Layers})");
        var stages = SplitLayers(model.Layers, pp);
        int moeLayers = model.Layers - model.DenseLayers;
        var owner = RoundRobin(moeLayers, model.MoE.RoutedExperts, workers.Count);
        return new TrainingPlan(epoch, workers.Count / pp, pp, stages, workers, owner);
    }

    /// <summary>Contiguous ranges whose sizes differ by at most one, larger ranges first.</summary>
    public static StageRange[] SplitLayers(int layers, int stages)
    {
        var result = new StageRange[stages];
        int start = 0;
        for (int s = 0; s < stages; s++)
        {
            int size = layers / stages + (s < layers % stages ? 1 : 0);
            result[s] = new StageRange(start, start + size);
            start += size;
        }
        return result;
    }

    /// <summary>
    /// Expert e of MoE layer l goes to worker (e + l) mod W: each worker gets ⌊E/W⌋ or ⌈E/W⌉ experts of
    /// every layer, and the offset by layer spreads the extra ones so no worker is always the heavy one.
    /// </summary>
    public static int[][] RoundRobin(int moeLayers, int experts, int workers)
        => Enumerable.Range(0, moeLayers).Select(l => Enumerable.Range(0, experts).Select(e => (e + l) % workers).ToArray()).ToArray();
}
