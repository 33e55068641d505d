namespace ElasticMoE.Training;

/// <summary>A node of the canonical reduction tree: level 0 is a micro-batch, level k covers 2^k of them.</summary>
public readonly record struct TreeNode(int Level, int Index)
{
    public override string ToString() => $"L{Level}#{Index}";
}

/// <summary>
/// The one order in which everything summed over the micro-batches of a step is summed: a fixed binary tree over
/// the micro-batch indices 0 .. leaves-1, a function of the global batch alone.
/// </summary>
/// <remarks>
/// <para>
/// Why a tree: float addition is not associative, so a sum's bits depend on its grouping. The single-process loop
/// used to add micro-batch gradients left to right, a replica its own share, the ring its replicas' partial sums:
/// three groupings, one per layout, and training amplified the last-bit differences to 1e-2 relative by step 100
/// (DP 3). Here node (k, i) covers micro-batches [i·2^k, (i+1)·2^k) clipped to the step's count, and its value is
/// left child + right child, one float addition per element (a node whose right half lies past the last micro-batch
/// is its left child, unchanged). Whoever computes a node — the loop, a replica over its contiguous share, the owner
/// of a segment in the all-reduce, a shard over the calls it served — gets the same bits, because the node's value
/// is defined by its leaves alone. A worker holding micro-batches [lo, hi) computes the maximal nodes inside that
/// range (<see cref="Cover"/>: at most 2·log2 of them) and the reduction combines those partials up to the root.
/// </para>
/// <para>
/// Chosen over exact fixed-point accumulation (int64 per element with an agreed exponent): that needs a max
/// all-reduce before any conversion, so every micro-batch's float gradient would have to be kept until the last one
/// is done (or converted with a guessed exponent that can overflow), and it sends 8 bytes an element instead of 4.
/// The tree costs one addition an element per node, as gradient accumulation did, and the all-reduce sends each
/// partial's segment once: a rank whose share is one aligned node sends what the ring sent.
/// </para>
/// <para>
/// Zero-sized values: a leaf may be absent (an expert that got no token in a micro-batch has no gradient), written
/// as null. A node with one absent child is the other child; both absent, absent. So "no gradient" stays none, and
/// AdamW leaves such an expert alone, as before.
/// </para>
/// </remarks>
public static class ReductionTree
{
    /// <summary>Smallest height h with 2^h ≥ leaves (0 for one leaf).</summary>
    public static int Height(int leaves)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(leaves);
        int h = 0;
        while ((1L << h) < leaves) h++;
        return h;
    }

    public static TreeNode Root(int leaves) => new(Height(leaves), 0);

    /// <summary>The micro-batches [Start, End) a node covers, clipped to <paramref name="leaves"/> (empty past the end).</summary>
    public static (int Start, int End) Range(TreeNode node, int leaves)
    {
        long start = (long)node.Index << node.Level;
        long end = Math.Min((long)(node.Index + 1) << node.Level, leaves);
        return start >= leaves ? (leaves, leaves) : ((int)start, (int)end);
    }

    /// <summary>
    /// The maximal nodes whose whole range lies inside [lo, hi), left to right: what a worker holding those
    /// micro-batches can sum on its own. Empty for an empty range.
    /// </summary>
    public static List<TreeNode> Cover(int lo, int hi, int leaves)
    {
        if (lo < 0 || hi > leaves || lo > hi) throw new ArgumentOutOfRangeException(nameof(lo), $"[{lo}, {hi}) is not inside [0, {leaves})");
        var nodes = new List<TreeNode>();
        if (lo < hi) CoverInto(Root(leaves), lo, hi, leaves, nodes);
        return nodes;
    }

    private static void CoverInto(TreeNode node, int lo, int hi, int leaves, List<TreeNode> into)
    {
        var (s, e) = Range(node, leaves);
        if (s >= e || e <= lo || s >= hi) return;
        if (lo <= s && e <= hi) { into.Add(node); return; }
        CoverInto(new TreeNode(node.Level - 1, node.Index * 2), lo, hi, leaves, into);
        CoverInto(new TreeNode(node.Level - 1, node.Index * 2 + 1), lo, hi, leaves, into);
    }

    /// <summary>
    /// The value of <paramref name="node"/> from partials that cover it exactly (as <see cref="Cover"/> gives them,
    /// from any number of holders): each node present is taken as it is, each other one is its children combined
    /// with <paramref name="add"/> (left, right). <paramref name="add"/> may reuse its left argument.
    /// </summary>
    /// <exception cref="InvalidOperationException">A part of the node's range is in no partial.</exception>
    public static T? Combine<T>(TreeNode node, int leaves, IReadOnlyDictionary<TreeNode, T?> partials, Func<T?, T?, T?> add)
    {
        if (partials.TryGetValue(node, out var value)) return value;
        var (s, e) = Range(node, leaves);
        if (node.Level == 0 || s >= e)
            throw new InvalidOperationException($"no partial covers micro-batch(es) [{s}, {e}) of node {node}");
        var left = new TreeNode(node.Level - 1, node.Index * 2);
        var right = new TreeNode(node.Level - 1, node.Index * 2 + 1);
        var l = Combine(left, leaves, partials, add);
        if (Range(right, leaves) is var (rs, re) && rs >= re) return l;
        var r = Combine(right, leaves, partials, add);
        return Add(l, r, add);
    }

    /// <summary>The whole step's value: <see cref="Combine{T}"/> at the root.</summary>
    public static T? CombineRoot<T>(int leaves, IReadOnlyDictionary<TreeNode, T?> partials, Func<T?, T?, T?> add)
        => Combine(Root(leaves), leaves, partials, add);

    internal static T? Add<T>(T? left, T? right, Func<T?, T?, T?> add)
        => left is null ? right : right is null ? left : add(left, right);
}

/// <summary>
/// Sums values of micro-batches [lo, hi) of a step in the canonical tree (<see cref="ReductionTree"/>) as they come,
/// in any order: a node is formed as soon as both its children are in, so in ascending or descending order at most
/// log2 values wait at once. <see cref="Partials"/> is then exactly <see cref="ReductionTree.Cover"/>'s nodes.
/// </summary>
public sealed class TreeAccumulator<T> where T : class
{
    private readonly int _leaves, _lo, _hi;
    private readonly Func<T?, T?, T?> _add;
    private readonly Dictionary<TreeNode, T?> _nodes = new();
    private readonly HashSet<int> _seen = new();

    /// <param name="add">left + right; may reuse (and return) its left argument, and own the right one.</param>
    public TreeAccumulator(int leaves, int lo, int hi, Func<T?, T?, T?> add)
    {
        if (lo < 0 || hi > leaves || lo > hi) throw new ArgumentOutOfRangeException(nameof(lo), $"[{lo}, {hi}) is not inside [0, {leaves})");
        _leaves = leaves;
        _lo = lo;
        _hi = hi;
        _add = add;
    }

    public int Leaves => _leaves;
    public bool Complete => _seen.Count == _hi - _lo;

    /// <summary>Adds micro-batch <paramref name="m"/>'s value (null: none), which the accumulator owns from here on.</summary>
    public void Add(int m, T? value)
    {
        if (m < _lo || m >= _hi) throw new ArgumentOutOfRangeException(nameof(m), m, $"micro-batch outside [{_lo}, {_hi})");
        if (!_seen.Add(m)) throw new InvalidOperationException($"micro-batch {m} was added twice");
        var node = new TreeNode(0, m);
        _nodes[node] = value;
        while (node.Level < ReductionTree.Height(_leaves))
        {
            var parent = new TreeNode(node.Level + 1, node.Index >> 1);
            var (ps, pe) = ReductionTree.Range(parent, _leaves);
            if (ps < _lo || pe > _hi) return;
            var left = new TreeNode(node.Level, parent.Index * 2);
            var right = new TreeNode(node.Level, parent.Index * 2 + 1);
            var (rs, re) = ReductionTree.Range(right, _leaves);
            T? combined;
            if (rs >= re)
            {
                combined = _nodes[left];
                _nodes.Remove(left);
            }
            else
            {
                if (!_nodes.ContainsKey(left) || !_nodes.ContainsKey(right)) return;
                combined = ReductionTree.Add(_nodes[left], _nodes[right], _add);
                _nodes.Remove(left);
                _nodes.Remove(right);
            }
            _nodes[parent] = combined;
            node = parent;
        }
    }

    /// <summary>The maximal nodes of [lo, hi), left to right, once every micro-batch of the range was added.</summary>
    public IReadOnlyList<(TreeNode Node, T? Value)> Partials
    {
        get
        {
            if (!Complete) throw new InvalidOperationException($"{_hi - _lo - _seen.Count} micro-batch(es) of [{_lo}, {_hi}) not added yet");
            return ReductionTree.Cover(_lo, _hi, _leaves).Select(n => (n, _nodes[n])).ToList();
        }
    }

    /// <summary>The values still held (to dispose them when an attempt is abandoned).</summary>
    public IEnumerable<T> Held => _nodes.Values.OfType<T>();

    /// <summary>The whole step's value; only when this accumulator covers every micro-batch.</summary>
    public T? Root
    {
        get
        {
            if (_lo != 0 || _hi != _leaves) throw new InvalidOperationException($"[{_lo}, {_hi}) is not the whole step of {_leaves}");
            return Partials[0].Value;
        }
    }
}

/// <summary>Per-micro-batch scalars (losses) added in micro-batch order, as the single-process loop adds them.</summary>
public static class MicroBatchLosses
{
    /// <summary>
    /// Σ over micro-batches 0 .. count-1, in that order, of values given as runs (micro-batch First + i at index i),
    /// from any number of workers in any order.
    /// </summary>
    /// <exception cref="InvalidOperationException">A micro-batch is missing or given twice.</exception>
    public static double Sum(IEnumerable<(int First, double[] Values)> runs, int count)
    {
        var values = new double[count];
        var seen = new bool[count];
        foreach (var (first, run) in runs)
            for (int i = 0; i < run.Length; i++)
            {
                int m = first + i;
                if ((uint)m >= (uint)count) throw new InvalidOperationException($"a loss for micro-batch {m} of a step of {count}");
                if (seen[m]) throw new InvalidOperationException($"micro-batch {m}'s loss was reported twice");
                seen[m] = true;
                values[m] = run[i];
            }
        int missing = Array.IndexOf(seen, false);
        if (missing >= 0) throw new InvalidOperationException($"no loss was reported for micro-batch {missing}");
        double sum = 0;
        foreach (var v in values) sum += v;
        return sum;
    }
}
