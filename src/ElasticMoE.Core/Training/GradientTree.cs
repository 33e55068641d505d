using ElasticMoE.Model;
using static TorchSharp.torch;

namespace ElasticMoE.Training;

/// <summary>
/// The gradients of a list of parameters summed over micro-batches [lo, hi) of a step in the canonical tree
/// (<see cref="ReductionTree"/>) instead of autograd's running sum: after each micro-batch's backward,
/// <see cref="Take"/> moves every parameter's gradient (that micro-batch's alone, since .grad was empty) into the
/// tree and leaves .grad empty for the next one.
/// </summary>
/// <remarks>
/// Cost against accumulating in .grad: the same additions (one per element and micro-batch after the first), an
/// allocation per micro-batch where autograd would have added in place (glibc reuses the blocks, see
/// <c>LibTorchLoader.TuneMalloc</c>), and at most log2(micro-batches) gradient sets alive at once.
/// </remarks>
public sealed class GradientTree : IDisposable
{
    private readonly IReadOnlyList<Tensor> _parameters;
    private readonly TreeAccumulator<Tensor?[]> _tree;

    public GradientTree(IReadOnlyList<Tensor> parameters, int leaves, int lo, int hi)
    {
        _parameters = parameters;
        _tree = new TreeAccumulator<Tensor?[]>(leaves, lo, hi, Add);
    }

    /// <summary>Moves the parameters' current gradients (micro-batch <paramref name="m"/>'s) into the tree; .grad is empty afterwards.</summary>
    public void Take(int m)
    {
        var parts = new Tensor?[_parameters.Count];
        for (int i = 0; i < parts.Length; i++)
        {
            var p = _parameters[i];
            if (p.grad is { } g) parts[i] = g.detach().DetachFromDisposeScope();
            p.grad = null;
        }
        _tree.Add(m, parts);
    }

    /// <summary>Adds micro-batch <paramref name="m"/>'s gradients given apart (one per parameter, null = none); the tree owns them.</summary>
    public void Put(int m, Tensor?[]? grads) => _tree.Add(m, grads ?? new Tensor?[_parameters.Count]);

    /// <summary>The maximal nodes of this tree's range and their gradients (still owned by the tree).</summary>
    public IReadOnlyList<(TreeNode Node, Tensor?[]? Grads)> Partials => _tree.Partials;

    /// <summary>Sets every parameter's .grad to the whole step's sum (none where no micro-batch gave one).</summary>
    public void InstallRoot() => Install(_tree.Root);

    /// <summary>Sets every parameter's .grad to <paramref name="grads"/> (one per parameter, null = none).</summary>
    public void Install(Tensor?[]? grads)
    {
        for (int i = 0; i < _parameters.Count; i++)
            _parameters[i].grad = grads?[i];   // the parameter holds its own reference; ours is disposed with the tree
    }

    /// <summary>left + right per parameter, into left's tensors (right's are disposed): the tree's one addition.</summary>
    public static Tensor?[]? Add(Tensor?[]? left, Tensor?[]? right)
    {
        if (left is null) return right;
        if (right is null) return left;
        using var _ = no_grad();
        for (int i = 0; i < left.Length; i++)
        {
            if (right[i] is not { } r) continue;
            if (left[i] is not { } l) { left[i] = r; continue; }
            l.add_(r, Scalars.One);
            r.Dispose();
        }
        return left;
    }

    public void Dispose()
    {
        foreach (var parts in _tree.Held)
            foreach (var t in parts) t?.Dispose();
    }
}
