using ElasticMoE.Planning;

namespace ElasticMoE.Tests.Planning;

/// <summary>
/// <see cref="RebalancePlanner"/> as it was before it was optimised for 1,024 workers (issue 25), kept verbatim as the
/// reference the optimised planner must match result for result (<see cref="RebalancePlannerEquivalenceTests"/>).
/// Not used by the product.
/// </summary>
internal static class RebalancePlannerReference
{
    private const double MinGain = RebalancePlanner.MinGain, InitialShare = RebalancePlanner.InitialShare;

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
        var sorted = RebalancePlanner.Check(loads, workers, slots, today);
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

    /// <summary>A copy added to (or removed from) a worker.</summary>
    private readonly record struct Edit(int Expert, int Worker, bool Add);

    /// <summary>A change to one layer and how many copies it moves (new (expert, worker) pairs).</summary>
    private sealed record Step(Edit[] Edits, int Moves);

    /// <summary>One layer's copies, as indices into the ascending worker list, with the loads they carry.</summary>
    private sealed class LayerState
    {
        private readonly double[] expertLoad;
        private readonly bool[][] has;        // [expert][worker]
        private readonly int[] copies;        // per expert
        private readonly List<int>[] held;    // per worker: its experts, ascending
        private readonly double[] load;       // per worker
        private readonly int slots;
        private readonly WorkerId[] workers;
        private readonly double[] trial;      // scratch for Evaluate

        public LayerState(IReadOnlyList<double> expertLoad, WorkerId[] workers, int slots, ExpertPlacement? today, int layer)
        {
            this.expertLoad = expertLoad.ToArray();
            this.slots = slots;
            this.workers = workers;
            int w = workers.Length;
            Mean = this.expertLoad.Sum() / w;
            has = this.expertLoad.Select(_ => new bool[w]).ToArray();
            copies = new int[this.expertLoad.Length];
            held = Enumerable.Range(0, w).Select(_ => new List<int>()).ToArray();
            load = new double[w];
            trial = new double[w];
            if (today is null) return;
            var index = workers.Select((id, i) => (id, i)).ToDictionary(t => t.id, t => t.i);
            for (int e = 0; e < has.Length; e++)
                foreach (var id in today.CopiesOf(layer, e))
                    if (index.TryGetValue(id, out int i)) has[e][i] = true;
            Recount();
        }

        public double Mean { get; }
        public double MaxLoad => load.Max();
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

        private void Set(int expert, int worker, bool holds)
        {
            has[expert][worker] = holds;
            Recount();
        }

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

        // From scratch after every change, so the loads never carry the rounding of a long chain of updates.
        private void Recount()
        {
            Array.Clear(load);
            foreach (var list in held) list.Clear();
            for (int e = 0; e < has.Length; e++)
            {
                copies[e] = 0;
                for (int w = 0; w < held.Length; w++) if (has[e][w]) copies[e]++;
                for (int w = 0; w < held.Length; w++)
                    if (has[e][w])
                    {
                        held[w].Add(e);
                        load[w] += expertLoad[e] / copies[e];
                    }
            }
        }

        public void Apply(Step step)
        {
            foreach (var edit in step.Edits) has[edit.Expert][edit.Worker] = edit.Add;
            Recount();
        }

        /// <summary>The best step that takes load off the busiest worker and moves at most <paramref name="budget"/> copies; null if none qualifies.</summary>
        public Step? BestStep(int budget)
        {
            int busiest = 0;
            for (int w = 1; w < load.Length; w++) if (load[w] > load[busiest]) busiest = w;
            double ceiling = load[busiest] - MinGain * Mean;
            if (!(ceiling < load[busiest])) return null;   // nothing to gain (all loads zero)
            Step? best = null;
            (double Max, int Moves, double SumSq) bestScore = default;
            foreach (var step in Candidates(busiest, ceiling))
            {
                if (step.Moves > budget || Evaluate(step, busiest, ceiling) is not (Verdict.Ok, var score)) continue;
                if (best is null || score.CompareTo(bestScore) < 0) (best, bestScore) = (step, score);
            }
            return best;
        }

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
                            if (Evaluate(step, a, ceiling).Verdict == Verdict.Overloads)
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
        /// The layer's max load, the step's moves and the sum of squared loads after <paramref name="step"/>. Ok when every slot holds and the
        /// busiest worker and every worker it loads end at or below <paramref name="ceiling"/>; Overloads when only a worker
        /// it loads (not the busiest) ends above; Invalid otherwise (a slot broken, an expert left without a copy).
        /// </summary>
        private (Verdict Verdict, (double Max, int Moves, double SumSq) Score) Evaluate(Step step, int busiest, double ceiling)
        {
            // Plain loops: this runs some ten thousand times per step.
            var edits = step.Edits;
            Array.Copy(load, trial, load.Length);
            for (int i = 0; i < edits.Length; i++)
            {
                int w = edits[i].Worker;
                if (edits[i].Add && held[w].Count + Added(edits, w) > slots) return (Verdict.Invalid, default);
                int e = edits[i].Expert, after = copies[e];
                bool first = true;
                for (int j = 0; j < edits.Length; j++)
                    if (edits[j].Expert == e)
                    {
                        first &= j >= i;
                        after += edits[j].Add ? 1 : -1;
                    }
                if (!first) continue;   // each expert once
                if (after <= 0) return (Verdict.Invalid, default);
                for (int v = 0; v < trial.Length; v++)
                {
                    double before = has[e][v] ? expertLoad[e] / copies[e] : 0;
                    double now = HasAfter(edits, e, v) ? expertLoad[e] / after : 0;
                    // Only shares that change are touched: a worker whose share stays put keeps its load to the bit.
                    if (now != before) trial[v] += now - before;
                }
            }
            if (trial[busiest] > ceiling) return (Verdict.Invalid, default);
            var verdict = Verdict.Ok;
            double max = 0, sumSq = 0;
            for (int w = 0; w < trial.Length; w++)
            {
                if (trial[w] > load[w] && trial[w] > ceiling) verdict = Verdict.Overloads;
                max = Math.Max(max, trial[w]);
                sumSq += trial[w] * trial[w];
            }
            return (verdict, (max, step.Moves, sumSq));
        }

        private bool HasAfter(Edit[] edits, int expert, int worker)
        {
            foreach (var x in edits)
                if (x.Expert == expert && x.Worker == worker) return x.Add;
            return has[expert][worker];
        }
    }
}
