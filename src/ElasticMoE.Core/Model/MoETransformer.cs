using ElasticMoE.Configuration;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ElasticMoE.Model;

/// <summary>Pre-norm transformer block: attention then FFN (dense SwiGLU or MoE), each with a residual.</summary>
public sealed class TransformerBlock : nn.Module<Tensor, Tensor>
{
    private readonly RMSNorm attn_norm, ffn_norm;
    private readonly nn.Module<Tensor, Tensor> attn;
    private readonly nn.Module<Tensor, Tensor> ffn;

    public TransformerBlock(int index, ModelOptions o, Rope rope) : base(nameof(TransformerBlock))
    {
        Index = index;
        attn_norm = new RMSNorm(o.DModel, o.NormEps);
        ffn_norm = new RMSNorm(o.DModel, o.NormEps);
        attn = o.Attention == AttentionKind.Mla ? new MultiHeadLatentAttention(o, rope) : new CausalSelfAttention(o.DModel, o.Heads, rope);
        ffn = o.IsMoELayer(index) ? new MoELayer(index, o.DModel, o.MoE) : new SwiGLU(o.DModel, o.DenseHidden);
        RegisterComponents();
    }

    public int Index { get; }
    public MoELayer? MoE => ffn as MoELayer;

    /// <summary>The block's attention (MHA or MLA), for inference with its cache.</summary>
    public IAttention Attention => (IAttention)attn;

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var h = x.Plus(attn.forward(attn_norm.forward(x)));
        return h.Plus(ffn.forward(ffn_norm.forward(h))).MoveToOuterDisposeScope();
    }

    /// <summary><see cref="forward"/> with the attention's keys and values cached (inference).</summary>
    public Tensor ForwardCached(Tensor x, KvCache.Layer cache)
    {
        using var scope = NewDisposeScope();
        var h = x.Plus(Attention.ForwardCached(attn_norm.forward(x), cache));
        return h.Plus(ffn.forward(ffn_norm.forward(h))).MoveToOuterDisposeScope();
    }
}

/// <summary>
/// The DeepSeek-style MoE language model over bytes. Exposes its pieces (embedding, blocks, head) so a
/// pipeline stage can run any contiguous range of blocks.
/// </summary>
public sealed class MoETransformer : nn.Module<Tensor, Tensor>
{
    private readonly Embedding embed;
    private readonly ModuleList<TransformerBlock> blocks;
    private readonly RMSNorm final_norm;
    private readonly Linear head;
    [NonSerialized] private readonly Rope _rope;

    public ModelOptions Options { get; }

    /// <summary>Builds the model with parameters drawn from <paramref name="seed"/> alone.</summary>
    public MoETransformer(ModelOptions o, long seed, Device? device = null) : base(nameof(MoETransformer))
    {
        Options = o;
        device ??= CPU;
        _rope = new Rope(o.RopeDim, o.Context, o.RopeTheta, CPU, ScalarType.Float32);
        embed = nn.Embedding(o.VocabSize, o.DModel);
        blocks = new ModuleList<TransformerBlock>(Enumerable.Range(0, o.Layers).Select(i => new TransformerBlock(i, o, _rope)).ToArray());
        final_norm = new RMSNorm(o.DModel, o.NormEps);
        head = nn.Linear(o.DModel, o.VocabSize, hasBias: false);
        RegisterComponents();
        Initialize(seed);
        if (device.type != DeviceType.CPU) this.to(device);
        _rope.MoveTo(device);
    }

    public ModuleList<TransformerBlock> Blocks => blocks;
    public IEnumerable<MoELayer> MoELayers => blocks.Select(b => b.MoE).OfType<MoELayer>();

    // GPT-2 style: N(0, 0.02) for matrices, residual output projections scaled by 1/sqrt(2L) so the
    // residual stream's variance does not grow with depth. Drawn from a private generator so the model is
    // a function of the seed alone, whatever else touched the global RNG.
    private void Initialize(long seed)
    {
        using var gen = new Generator((ulong)seed);
        using var _ = no_grad();
        var residualStd = 0.02 / Math.Sqrt(2.0 * Options.Layers);
        foreach (var (name, p) in named_parameters())
        {
            if (p.dim() < 2) continue; // norms stay at one
            var std = name.EndsWith("proj.weight", StringComparison.Ordinal) || name.EndsWith("w2.weight", StringComparison.Ordinal)
                ? residualStd : 0.02;
            p.normal_(0, std, gen);
        }
    }

    public Tensor Embed(Tensor tokens) => embed.forward(tokens);

    /// <summary>Runs blocks [from, to) on hidden states [B, T, d].</summary>
    public Tensor RunBlocks(Tensor h, int from, int to)
    {
        for (int i = from; i < to; i++)
        {
            var next = blocks[i].forward(h);
            if (i > from) h.Dispose();
            h = next;
        }
        return h;
    }

    public Tensor Head(Tensor h)
    {
        using var scope = NewDisposeScope();
        return head.forward(final_norm.forward(h)).MoveToOuterDisposeScope();
    }

    /// <summary>tokens [B, T] → logits [B, T, V].</summary>
    public override Tensor forward(Tensor tokens)
    {
        using var scope = NewDisposeScope();
        var h = RunBlocks(Embed(tokens), 0, blocks.Count);
        return Head(h).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Inference: tokens [B, T] that follow the <see cref="KvCache.Length"/> tokens already in
    /// <paramref name="cache"/> → their logits [B, T, V], the cache extended by them. Equal (within float
    /// rounding) to the last T positions of <see cref="forward"/> on the whole sequence.
    /// </summary>
    public Tensor ForwardCached(Tensor tokens, KvCache cache)
    {
        ArgumentNullException.ThrowIfNull(cache);
        using var scope = NewDisposeScope();
        var h = Embed(tokens);
        for (int i = 0; i < blocks.Count; i++) h = blocks[i].ForwardCached(h, cache[i]);
        return Head(h).MoveToOuterDisposeScope();
    }

    /// <summary>An empty KV cache for <paramref name="batch"/> sequences of up to the context's length, shaped by the attention (MLA's holds only its latent and RoPE key).</summary>
    public KvCache NewKvCache(int batch = 1)
    {
        var p = embed.weight!;
        return new KvCache(blocks.Select(b => b.Attention.NewCacheLayer(batch, Options.Context, p.dtype, p.device)));
    }

    /// <summary>Mean next-byte cross-entropy in nats.</summary>
    public static Tensor CrossEntropy(Tensor logits, Tensor targets)
        => nn.functional.cross_entropy(logits.reshape(-1, logits.shape[^1]), targets.reshape(-1));

    /// <summary>Sum of the MoE layers' sequence-wise balance losses from the last forward, or null.</summary>
    public Tensor? AuxLoss() => MoELayer.SumAuxLoss(MoELayers);

    /// <summary>Per-MoE-layer expert token counts accumulated since the last call; resets them.</summary>
    public long[][] TakeExpertCounts() => MoELayers.Select(l => l.TakeStepCounts()).ToArray();

    protected override void Dispose(bool disposing)
    {
        if (disposing) _rope.Dispose();
        base.Dispose(disposing);
    }
}
