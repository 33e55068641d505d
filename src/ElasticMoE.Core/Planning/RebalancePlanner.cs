namespace ElasticMoE.Planning;

/// <summary>
/// What a rebalance would do: the new placement, max/mean (<see cref="ExpertPlacement.MaxOverMean"/> on the loads it
/// was planned for) before and after, and the copies it moves (<see cref="ExpertPlacement.CopiesMovedFrom"/>).
/// "Before" is today's placement, or, where it had to be repaired first (workers left or joined, slots shrank),
/// the repaired one; for an initial placement it is the packing the planner starts from (see <see cref="RebalancePlanner.InitialShare"/>).
/// </summary>
public sealed record RebalanceResult(ExpertPlacement Placement, double MaxOverMeanBefore, double MaxOverMeanAfter, int CopiesMoved);

/// <summary>
/// Low-churn expert placement: starting from today's placement, it improves it one small step at a time and
/// stops when the churn budget is spent or no step is worth its copy. Pure and deterministic: the same
/// loads, workers (in any order) and placement always give the same result.
/// </summary>
/// <remarks>
/// <para>Why not recompute from scratch, as DeepSeek's EPLB does (<see cref="EplbPlanner"/>): a from-scratch
/// packing is a function of the loads' order, so a small drift re-sorts the experts and most copies land
/// elsewhere (P6: EPLB moves 77 % of the copies per rebalance under ±10 % drift, ours 2.8 %). Every moved copy is an
/// expert's parameters and AdamW moments sent at a step boundary while the run waits. Here a step moves at
/// most two copies, and only when it takes load off the busiest worker.</para>
/// <para>Each step, in the layer with the highest max/mean, takes load off its busiest worker by one of: drop
/// a redundant copy there (moves nothing), move a copy to another worker, add a copy elsewhere (the expert's
/// tokens are then split over one more copy), either of those after evicting a redundant copy from a full
/// worker or followed by the receiver dropping or passing on one of its own copies (two moves), or swap a copy
/// with a lighter one of another worker (two moves). Of the steps that leave every
/// worker they touch at least <see cref="MinGain"/> × the mean below the busiest load, it takes the one
/// with the lowest resulting layer max, then the fewest moves, then the lowest sum of squared loads, then
/// the first in a fixed order (experts ascending, workers by <see cref="WorkerId"/>). Each step strictly
/// lowers the layer's loads sorted descending, so the layer's max never rises: the result is never worse than
/// today's, and it is today's (equal) when no step qualifies.</para>
/// </remarks>
public static class RebalancePlanner
{
    /// <summary>
    /// Least gain a step must bring, as a fraction of the layer's mean worker load: the price of a copy moved. Lower,
    /// the planner spends its budget on gains the next drift undoes. Measured on P6 (±10 % drift per rebalance, copies
    /// moved per rebalance for the max/mean kept): 0.5 %: 8.3 % for 1.005; 1 %: 5.4 % for 1.008; 2 %: 2.8 % for 1.015;
    /// 5 %: 0.8 % for 1.037. 2 % keeps well within the 1.05 target at a third of the moves of 0.5 %.
    /// </summary>
    public const double MinGain = 0.02;

    /// <summary>
    /// An initial placement copies an expert until its load per copy is at most this fraction of the mean worker load.
    /// Copies of hot experts are what later rebalances shift load with: dropping one moves nothing. Measured on P6:
    /// 0.25 → 309 of 320 slots used, Zipf max/mean 1.008, under drift 1.015 kept with 2.8 % moved; 0.5 → 287 copies,
    /// 1.002, then 1.019 (worst 1.050) with 3.9 %; 1 → 272 copies, and a hot expert that grows with the drift gets stuck
    /// on one worker: 1.148 kept.
    /// </summary>
    public const double InitialShare = 0.25;

    /// <summary>
    /// A placement for <paramref name="loads"/> ([layer][expert], e.g. tokens over the load window) on
    /// <paramref name="workers"/>, each holding at most <paramref name="slots"/> copies per layer.
    /// </summary>
    /// <param name="today">The placement in force; null for the initial placement (then nothing counts as moved,
    /// and the budget is unlimited). Copies on workers not in <paramref name="workers"/> are gone; experts left
    /// without a copy, and workers above <paramref name="slots"/>, are repaired first (a lost expert placed on the
    /// least loaded worker with room, an excess copy dropped if redundant, else moved), even past the budget.</param>
    /// <param name="churnBudget">Most copies moved (new (layer, expert, worker)); repairs count against it first.</param>
    /// <exception cref="ArgumentException">Malformed loads, no workers, too few slots for the experts, a negative budget.</exception>
    public static RebalanceResult Plan(IReadOnlyList<IReadOnlyList<double>> loads, IReadOnlyList<WorkerId> workers, int slots,
        ExpertPlacement? today, int churnBudget)
    {
        var sorted = Check(loads, workers, slots, today);
        ArgumentOutOfRangeException.ThrowIfNegative(churnBudget);
        var layers = Enumerable.Range(0, loads.Count).Select(l => new LayerState(loads[l], sorted, slots, today, l)).ToArray();
        int budget = today is null ? int.MaxValue : churnBudget;
        foreach (var layer in layers)
            if (today is null) layer.Initial();
            else budget -= layer.Repair();
        budget = Math.Max(budget, 0);
        double before = layers.Sum(s => s.Mean) > 0 ? layers.Sum(s => s.MaxLoad) / layers.Sum(s => s.Mean) : 1;

        // The worst layer first: MoE layers run in sequence, so each one's busiest worker adds to the step.
        var done = new bool[layers.Length];
        while (true)
        {
            int worst = -1;
            for (int l = 0; l < layers.Length; l++)
                if (!done[l] && (worst < 0 || layers[l].Imbalance > layers[worst].Imbalance)) worst = l;
            if (worst < 0) break;
            var step = layers[worst].BestStep(budget);
            if (step is null) { done[worst] = true; continue; }
            layers[worst].Apply(step);
            budget -= step.Moves;
        }

        var placement = new ExpertPlacement(sorted, layers.Select(s => s.Holders()));
        return new RebalanceResult(placement, before, placement.MaxOverMean(loads), today is null ? 0 : placement.CopiesMovedFrom(today));
    }

    /// <summary>Checks the request; returns the workers ascending by identity.</summary>
    internal static WorkerId[] Check(IReadOnlyList<IReadOnlyList<double>> loads, IReadOnlyList<WorkerId> workers, int slots, ExpertPlacement? today)
    {
        ArgumentNullException.ThrowIfNull(loads);
        ArgumentNullException.ThrowIfNull(workers);
        var sorted = workers.Order().ToArray();
        if (sorted.Length == 0) throw new ArgumentException("a placement needs at least one worker", nameof(workers));
        if (sorted.Distinct().Count() != sorted.Length) throw new ArgumentException("a worker appears more than once", nameof(workers));
        for (int l = 0; l < loads.Count; l++)
        {
            if (loads[l].Count == 0) throw new ArgumentException($"layer {l} has no experts", nameof(loads));
            if (loads[l].Any(x => !double.IsFinite(x) || x < 0)) throw new ArgumentException($"layer {l} has a negative or non-finite load", nameof(loads));
            if ((long)slots * sorted.Length < loads[l].Count)
                throw new ArgumentException($"{sorted.Length} workers x {slots} slots cannot hold the {loads[l].Count} experts of layer {l}", nameof(slots));
        }
        if (today is not null && (today.Layers != loads.Count || Enumerable.Range(0, loads.Count).Any(l => today.ExpertCount(l) != loads[l].Count)))
            throw new ArgumentException("today's placement is of another model than the loads (layers or experts differ)", nameof(today));
        return sorted;
    }

    /// <summary>A copy added to (or removed from) a worker.</summary>
    private readonly record struct Edit(int Expert, int Worker, bool Add);

    /// <summary>A change to one layer and how many copies it moves (new (expert, worker) pairs).</summary>
    private sealed record Step(Edit[] Edits, int Moves);

    /// <summary>One layer's copies, as indices into the ascending worker list, with the loads they carry.</summary>
    /// <remarks>
    /// Built for 1,024 workers x 256 experts (issue 25) with results identical to the first version (kept in the tests as
    /// <c>RebalancePlannerReference</c>, which they are checked against): a change recounts only the workers whose load it
    /// can change, each by the same ascending fold over its experts as a full recount; a candidate step touches only the
    /// workers holding the experts it edits, and its sum of squared loads (the last tie-break, a fold over every worker) is
    /// folded only when its max load and moves tie the best so far and the two sums are too close to tell apart from the
    /// workers each step changes (see <c>SumSqBelow</c>).
    /// </remarks>
    private sealed class LayerState
    {
        private readonly double[] expertLoad;
        private readonly bool[][] has;        // [expert][worker]
        private readonly int[] copies;        // per expert
        private readonly List<int>[] holders; // per expert: its workers, ascending
        private readonly List<int>[] held;    // per worker: its experts, ascending
        private readonly double[] load;       // per worker
        private readonly int slots;
        private readonly WorkerId[] workers;
        private readonly double[] trial;      // scratch for Evaluate: equal to load outside an evaluation
        private readonly int[] touchedAt;     // per worker: the evaluation that last changed its trial load
        private readonly List<int> touched = new();
        private readonly double[] folded;     // scratch for a best step's sum of squares
        private double? loadSumSq;
        private int evaluation;
        private readonly int[] byLoad;        // workers by load descending (ties: index ascending), when not stale
        private bool byLoadStale;
        private double maxLoad;

        public LayerState(IReadOnlyList<double> expertLoad, WorkerId[] workers, int slots, ExpertPlacement? today, int layer)
        {
            this.expertLoad = expertLoad.ToArray();
            this.slots = slots;
            this.workers = workers;
            int w = workers.Length;
            Mean = this.expertLoad.Sum() / w;
            has = this.expertLoad.Select(_ => new bool[w]).ToArray();
            copies = new int[this.expertLoad.Length];
            holders = this.expertLoad.Select(_ => new List<int>()).ToArray();
            held = Enumerable.Range(0, w).Select(_ => new List<int>()).ToArray();
            load = new double[w];
            trial = new double[w];
            folded = new double[w];
            touchedAt = new int[w];
            byLoad = Enumerable.Range(0, w).ToArray();
            if (today is null) return;
            var index = workers.Select((id, i) => (id, i)).ToDictionary(t => t.id, t => t.i);
            for (int e = 0; e < has.Length; e++)
                foreach (var id in today.CopiesOf(layer, e))
                    if (index.TryGetValue(id, out int i)) has[e][i] = true;
            Recount();
        }

        public double Mean { get; }
        public double MaxLoad => maxLoad;
        public double Imbalance => Mean > 0 ? MaxLoad / Mean : 1;

        public IEnumerable<IEnumerable<WorkerId>> Holders()
            => has.Select(row => Enumerable.Range(0, row.Length).Where(w => row[w]).Select(w => workers[w]));

        /// <summary>Brings the layer within its slots with every expert held; returns the copies this moved.</summary>
        public int Repair()
        {
            int moved = 0;
            // A redundant copy costs nothing to drop: first those of the workers above their slots, the coldest share first.
            for (int w = 0; w < held.Length; w++)
                while (held[w].Count > slots)
                {
                    int drop = held[w].Where(e => copies[e] > 1).OrderBy(Share).ThenBy(e => e).DefaultIfEmpty(-1).First();
                    if (drop < 0) break;
                    Set(drop, w, false);
                }
            // Then a worker still above its slots gives its coldest experts away.
            for (int w = 0; w < held.Length; w++)
                while (held[w].Count > slots)
                {
                    int victim = held[w].OrderBy(Share).ThenBy(e => e).First();
                    Set(victim, w, false);
                    Set(victim, Room(victim, exclude: w), true);
                    moved++;
                }
            // Experts left without a copy (their holders left): heaviest first onto the least loaded worker with room.
            foreach (int e in Enumerable.Range(0, copies.Length).Where(e => copies[e] == 0).OrderByDescending(e => expertLoad[e]).ThenBy(e => e).ToList())
            {
                Set(e, Room(e, exclude: -1), true);
                moved++;
            }
            return moved;
        }

        private void Set(int expert, int worker, bool holds) => Update([new Edit(expert, worker, holds)]);

        /// <summary>
        /// The least loaded worker (but <paramref name="exclude"/>) that can take a copy of <paramref name="expert"/>; if
        /// every such worker is full, room made on one by dropping its coldest redundant copy. There always is one: the
        /// workers' slots hold every expert once, so full workers mean redundant copies.
        /// </summary>
        private int Room(int expert, int exclude)
        {
            int w = LeastLoadedWithRoom(expert, exclude);
            if (w >= 0) return w;
            var (drop, at) = Enumerable.Range(0, held.Length).Where(v => v != exclude && !has[expert][v])
                .SelectMany(v => held[v].Where(g => copies[g] > 1).Select(g => (g, v)))
                .OrderBy(t => Share(t.g)).ThenBy(t => t.v).ThenBy(t => t.g).First();
            Set(drop, at, false);
            return at;
        }

        /// <summary>
        /// The initial placement, before any step: copies for the experts whose load per copy exceeds
        /// <see cref="InitialShare"/> × the mean worker load (one more at a time to the expert with the highest load per
        /// copy, as EPLB replicates), then every copy, heaviest share first, onto the least loaded worker with room
        /// that does not hold that expert yet (longest-processing-time packing).
        /// </summary>
        public void Initial()
        {
            int experts = copies.Length, room = held.Length * slots;
            var count = Enumerable.Repeat(1, experts).ToArray();
            for (int total = experts; total < room; total++)
            {
                int hottest = -1;
                for (int e = 0; e < experts; e++)
                    if (count[e] < held.Length && (hottest < 0 || expertLoad[e] / count[e] > expertLoad[hottest] / count[hottest])) hottest = e;
                if (hottest < 0 || expertLoad[hottest] / count[hottest] <= InitialShare * Mean) break;
                count[hottest]++;
            }
            var order = Enumerable.Range(0, experts).SelectMany(e => Enumerable.Repeat(e, count[e]))
                .OrderByDescending(e => expertLoad[e] / count[e]).ThenBy(e => e).ToList();
            foreach (int e in order)
            {
                // Every worker with room may already hold this expert: then it gets one copy fewer.
                int w = LeastLoadedWithRoom(e, exclude: -1);
                if (w < 0) continue;
                has[e][w] = true;
                held[w].Add(e);
                load[w] += expertLoad[e] / count[e];
            }
            Recount();
        }

        private double Share(int expert) => expertLoad[expert] / copies[expert];

        /// <summary>The least loaded worker but <paramref name="exclude"/> with a free slot and no copy of <paramref name="expert"/>; -1 if none.</summary>
        private int LeastLoadedWithRoom(int expert, int exclude)
        {
            int best = -1;
            for (int w = 0; w < held.Length; w++)
                if (w != exclude && held[w].Count < slots && !has[expert][w] && (best < 0 || load[w] < load[best])) best = w;
            return best;
        }

        // From scratch, so the loads never carry the rounding of a long chain of updates: each worker's load is the fold of
        // its experts' shares in ascending expert order. Update keeps exactly that for the workers a change touches.
        private void Recount()
        {
            Array.Clear(load);
            foreach (var list in held) list.Clear();
            for (int e = 0; e < has.Length; e++)
            {
                copies[e] = 0;
                holders[e].Clear();
                for (int w = 0; w < held.Length; w++) if (has[e][w]) { copies[e]++; holders[e].Add(w); }
                for (int w = 0; w < held.Length; w++)
                    if (has[e][w])
                    {
                        held[w].Add(e);
                        load[w] += expertLoad[e] / copies[e];
                    }
            }
            Array.Copy(load, trial, load.Length);
            Reloaded();
        }

        /// <summary>
        /// Applies <paramref name="edits"/> in order and recounts what they can change: the edited experts' copies and
        /// holders, the edited workers' expert lists, and the load of every worker holding an edited expert before or
        /// after (its share changed), each folded afresh over its experts ascending, as <see cref="Recount"/> does.
        /// </summary>
        private void Update(Edit[] edits)
        {
            var experts = new List<int>(edits.Length);
            var affected = new HashSet<int>();
            foreach (var edit in edits)
            {
                if (!experts.Contains(edit.Expert))
                {
                    experts.Add(edit.Expert);
                    affected.UnionWith(holders[edit.Expert]);
                }
                has[edit.Expert][edit.Worker] = edit.Add;
            }
            foreach (int e in experts)
            {
                holders[e].Clear();
                for (int w = 0; w < held.Length; w++) if (has[e][w]) holders[e].Add(w);
                copies[e] = holders[e].Count;
                affected.UnionWith(holders[e]);
            }
            foreach (var edit in edits)
            {
                var list = held[edit.Worker];
                int at = list.BinarySearch(edit.Expert);
                if (edit.Add == has[edit.Expert][edit.Worker])   // the edit's final state (a later edit of the pair wins)
                {
                    if (has[edit.Expert][edit.Worker] && at < 0) list.Insert(~at, edit.Expert);
                    else if (!has[edit.Expert][edit.Worker] && at >= 0) list.RemoveAt(at);
                }
            }
            foreach (int w in affected)
            {
                double sum = 0;
                foreach (int e in held[w]) sum += expertLoad[e] / copies[e];
                load[w] = sum;
                trial[w] = sum;
            }
            Reloaded();
        }

        // The order by load is sorted when an evaluation needs it: a repair changes a layer many times before that.
        private void Reloaded()
        {
            maxLoad = load.Length == 0 ? 0 : load.Max();
            byLoadStale = true;
            loadSumSq = null;
        }

        private int[] ByLoad()
        {
            if (byLoadStale)
            {
                Array.Sort(byLoad, (x, y) => load[x] != load[y] ? load[y].CompareTo(load[x]) : x.CompareTo(y));
                byLoadStale = false;
            }
            return byLoad;
        }

        public void Apply(Step step) => Update(step.Edits);

        /// <summary>The best step that takes load off the busiest worker and moves at most <paramref name="budget"/> copies; null if none qualifies.</summary>
        public Step? BestStep(int budget)
        {
            int busiest = 0;
            for (int w = 1; w < load.Length; w++) if (load[w] > load[busiest]) busiest = w;
            double ceiling = load[busiest] - MinGain * Mean;
            if (!(ceiling < load[busiest])) return null;   // nothing to gain (all loads zero)
            // Best by (max load, moves, sum of squared loads), lowest first, the first of equals kept.
            Best? best = null;
            foreach (var step in Candidates(busiest, ceiling))
            {
                if (step.Moves > budget) continue;
                try
                {
                    var (verdict, max) = Evaluate(step, busiest, ceiling);
                    if (verdict != Verdict.Ok) continue;
                    int order = best is null ? -1 : (max, step.Moves).CompareTo((best.Max, best.Moves));
                    if (order > 0 || (order == 0 && !SumSqBelow(best!))) continue;
                    best = Capture(step, max);
                }
                finally
                {
                    EndEvaluation();
                }
            }
            return best?.Step;
        }

        /// <summary>The best step so far: its score, and its loads where they differ from today's (for its sum of squares).</summary>
        private sealed class Best(Step step, double max, double delta, double magnitude, int[] workers, double[] loads)
        {
            public Step Step { get; } = step;
            public double Max { get; } = max;
            public int Moves => Step.Moves;
            /// <summary>Its sum of squared loads minus today's, over the workers it changes, and the sum of those squares' magnitudes.</summary>
            public double Delta { get; } = delta;
            public double Magnitude { get; } = magnitude;
            public int[] Workers { get; } = workers;
            public double[] Loads { get; } = loads;
            public double? SumSq { get; set; }
        }

        private Best Capture(Step step, double max)
        {
            var (delta, magnitude) = TouchedSquares();
            return new Best(step, max, delta, magnitude, touched.ToArray(), touched.Select(w => trial[w]).ToArray());
        }

        private (double Delta, double Magnitude) TouchedSquares()
        {
            double delta = 0, magnitude = 0;
            foreach (int w in touched)
            {
                double t2 = trial[w] * trial[w], l2 = load[w] * load[w];
                delta += t2 - l2;
                magnitude += t2 + l2;
            }
            return (delta, magnitude);
        }

        /// <summary>
        /// True when the step being evaluated has a lower sum of squared loads than <paramref name="best"/>, the sums being
        /// the fold over every worker in order (as the first version computed them, to the bit). The fold costs a pass over
        /// every worker, and at 1,024 workers most candidates tie on max and moves; so the two sums are first compared by
        /// their differences from today's over the workers each changes, and folded only when that difference is within a
        /// bound on the folds' rounding: a fold of n squares is within n·2^-53 (relative) of the exact sum, and the margin
        /// here is some 30 times that.
        /// </summary>
        private bool SumSqBelow(Best best)
        {
            var (delta, magnitude) = TouchedSquares();
            double margin = 4e-15 * (load.Length + touched.Count + best.Workers.Length + 16) * (2 * LoadSumSq() + 2 * (magnitude + best.Magnitude));
            double diff = delta - best.Delta;
            if (diff < -margin) return true;
            if (diff > margin) return false;
            if (best.SumSq is null)
            {
                Array.Copy(load, folded, load.Length);
                for (int i = 0; i < best.Workers.Length; i++) folded[best.Workers[i]] = best.Loads[i];
                best.SumSq = Fold(folded);
            }
            return Fold(trial) < best.SumSq.Value;
        }

        private static double Fold(double[] loads)
        {
            double sumSq = 0;
            for (int w = 0; w < loads.Length; w++) sumSq += loads[w] * loads[w];
            return sumSq;
        }

        private double LoadSumSq() => loadSumSq ??= Fold(load);

        /// <summary>
        /// Every step that takes a copy's load off <paramref name="a"/>, in a fixed order (experts ascending, then workers):
        /// drop a redundant copy; move or add a copy to a worker with room, or to a full one after dropping a redundant copy
        /// there; swap with a copy of another worker. A move or add that would overload its receiver is followed by a
        /// second hop that relieves the receiver (drop or move one of its copies): an ejection chain, which is what lets
        /// a hot expert get a copy when every other worker is already near the busiest load.
        /// </summary>
        private IEnumerable<Step> Candidates(int a, double ceiling)
        {
            foreach (int e in held[a].ToArray())
            {
                if (copies[e] > 1) yield return new([new(e, a, false)], 0);
                for (int b = 0; b < held.Length; b++)
                {
                    if (b == a || has[e][b]) continue;
                    Edit[][] hops = [[new(e, a, false), new(e, b, true)], [new(e, b, true)]];
                    foreach (var hop in hops)
                    {
                        if (held[b].Count < slots)
                        {
                            var step = new Step(hop, 1);
                            yield return step;
                            var (verdict, _) = Evaluate(step, a, ceiling);
                            EndEvaluation();
                            if (verdict == Verdict.Overloads)
                                foreach (var relief in Relieve(b, e, hop))
                                    yield return relief;
                        }
                        else
                            foreach (int g in held[b].Where(g => copies[g] > 1).ToArray())
                                yield return new([new(g, b, false), .. hop], 1);
                    }
                    foreach (int f in held[b].Where(f => !has[f][a]).ToArray())
                        yield return new([new(e, a, false), new(e, b, true), new(f, b, false), new(f, a, true)], 2);
                }
            }
        }

        /// <summary><paramref name="hop"/> followed by dropping or moving one of <paramref name="b"/>'s other copies.</summary>
        private IEnumerable<Step> Relieve(int b, int e, Edit[] hop)
        {
            foreach (int f in held[b].ToArray())
            {
                if (f == e) continue;
                if (copies[f] > 1) yield return new([.. hop, new(f, b, false)], 1);
                for (int c = 0; c < held.Length; c++)
                    if (c != b && !has[f][c] && held[c].Count + Added(hop, c) < slots)
                        yield return new([.. hop, new(f, b, false), new(f, c, true)], 2);
            }
        }

        /// <summary>Copies <paramref name="edits"/> add to <paramref name="worker"/>, net.</summary>
        private static int Added(Edit[] edits, int worker)
        {
            int n = 0;
            foreach (var x in edits) if (x.Worker == worker) n += x.Add ? 1 : -1;
            return n;
        }

        private enum Verdict { Ok, Overloads, Invalid }

        /// <summary>
        /// The layer's max load after <paramref name="step"/>. Ok when every slot holds and the busiest worker and every
        /// worker it loads end at or below <paramref name="ceiling"/>; Overloads when only a worker it loads (not the busiest)
        /// ends above; Invalid otherwise (a slot broken, an expert left without a copy). Leaves the loads after the step in
        /// trial (the workers it changes listed in touched) for the caller's tie-break: call <see cref="EndEvaluation"/> after.
        /// </summary>
        private (Verdict Verdict, double Max) Evaluate(Step step, int busiest, double ceiling)
        {
            // Plain loops: this runs some ten thousand times per step. Only the workers holding an edited expert (before or
            // after) change.
            var edits = step.Edits;
            evaluation++;
            for (int i = 0; i < edits.Length; i++)
            {
                int w = edits[i].Worker;
                if (edits[i].Add && held[w].Count + Added(edits, w) > slots) return (Verdict.Invalid, 0);
                int e = edits[i].Expert, after = copies[e];
                bool first = true;
                for (int j = 0; j < edits.Length; j++)
                    if (edits[j].Expert == e)
                    {
                        first &= j >= i;
                        after += edits[j].Add ? 1 : -1;
                    }
                if (!first) continue;   // each expert once
                if (after <= 0) return (Verdict.Invalid, 0);
                foreach (int v in holders[e]) Shift(edits, e, v, after);
                for (int j = i; j < edits.Length; j++)
                {
                    int v = edits[j].Worker;
                    if (edits[j].Expert != e || has[e][v] || SeenBefore(edits, j)) continue;
                    Shift(edits, e, v, after);
                }
            }
            if (trial[busiest] > ceiling) return (Verdict.Invalid, 0);
            var verdict = Verdict.Ok;
            double max = 0;
            foreach (int w in touched)
            {
                if (trial[w] > load[w] && trial[w] > ceiling) verdict = Verdict.Overloads;
                max = Math.Max(max, trial[w]);
            }
            foreach (int w in ByLoad())
                if (touchedAt[w] != evaluation) { max = Math.Max(max, load[w]); break; }
            return (verdict, max);
        }

        /// <summary>Puts trial back to today's loads after an <see cref="Evaluate"/>.</summary>
        private void EndEvaluation()
        {
            foreach (int w in touched) trial[w] = load[w];
            touched.Clear();
        }

        /// <summary>Moves worker <paramref name="v"/>'s trial load by the change of its share of <paramref name="expert"/>.</summary>
        private void Shift(Edit[] edits, int expert, int v, int after)
        {
            double before = has[expert][v] ? expertLoad[expert] / copies[expert] : 0;
            double now = HasAfter(edits, expert, v) ? expertLoad[expert] / after : 0;
            // Only shares that change are touched: a worker whose share stays put keeps its load to the bit.
            if (now == before) return;
            trial[v] += now - before;
            if (touchedAt[v] != evaluation) { touchedAt[v] = evaluation; touched.Add(v); }
        }

        private static bool SeenBefore(Edit[] edits, int j)
        {
            for (int k = 0; k < j; k++)
                if (edits[k].Expert == edits[j].Expert && edits[k].Worker == edits[j].Worker) return true;
            return false;
        }

        private bool HasAfter(Edit[] edits, int expert, int worker)
        {
            foreach (var x in edits)
                if (x.Expert == expert && x.Worker == worker) return x.Add;
            return has[expert][worker];
        }
    }
}
