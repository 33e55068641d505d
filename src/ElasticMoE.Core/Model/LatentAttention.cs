using ElasticMoE.Configuration;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ElasticMoE.Model;

/// <summary>
/// Causal multi-head latent attention (MLA) as DeepSeek-V2/V3 define it (V3 §2.1.1; <c>inference/model.py</c>, class MLA).
/// </summary>
/// <remarks>
/// <para>Keys and values come from one joint latent <c>c_KV = RMSNorm(W_DKV h)</c> of kv-lora-rank, rebuilt per head by
/// <c>W_UK</c> and <c>W_UV</c> (the two halves of each head's rows of <c>wkv_b</c>, in V3's layout); RoPE is kept out of
/// the latent: one decoupled RoPE key of qk-rope-head-dim (the rest of <c>wkv_a</c>'s output) is shared by every head.
/// The query goes through its own latent (<c>wq_a</c>, <c>q_norm</c>, <c>wq_b</c>) when q-lora-rank &gt; 0, else one
/// plain <c>wq</c>; per head it has a qk-nope-head-dim part and a qk-rope-head-dim part. Scores are scaled by
/// 1/sqrt(nope + rope).</para>
/// <para>Two forms of the same maths. Training (<see cref="forward"/>) rebuilds every head's key and value and runs the
/// usual attention: that is the cheaper form when every position is a query. Generation
/// (<see cref="ForwardCached"/>) keeps only c_KV and the RoPE key per token (kv-lora-rank + qk-rope-head-dim elements
/// instead of MHA's 2 × heads × head-dim) and folds W_UK into the query and W_UV into the output ("absorbed"), so the
/// per-head keys and values are never rebuilt for the cached positions.</para>
/// <para>Parameter names are V3's but for the output projection, called <c>proj</c> like MHA's: the initialisation
/// scales residual output projections by that name, and a block's unit holds every <c>blocks.B.attn.*</c> tensor,
/// whatever the attention, so checkpoints, mirrors and moves need nothing new.</para>
/// </remarks>
public sealed class MultiHeadLatentAttention : nn.Module<Tensor, Tensor>, IAttention
{
    // Declared in the order V3 applies them: parameters are registered, and so initialised from the seed, in field order.
    private readonly Linear? wq, wq_a, wq_b;
    private readonly RMSNorm? q_norm;
    private readonly Linear wkv_a, wkv_b, proj;
    private readonly RMSNorm kv_norm;
    private readonly int _heads, _nope, _rope, _v, _kvRank;
    private readonly double _scale;
    [NonSerialized] private readonly Rope _ropeTables;

    public MultiHeadLatentAttention(ModelOptions o, Rope rope) : base(nameof(MultiHeadLatentAttention))
    {
        ArgumentNullException.ThrowIfNull(o);
        (_heads, _nope, _rope, _v, _kvRank) = (o.Heads, o.QkNopeHeadDim, o.QkRopeHeadDim, o.VHeadDim, o.KvLoraRank);
        int qk = _nope + _rope;
        if (o.QLoraRank > 0)
        {
            wq_a = nn.Linear(o.DModel, o.QLoraRank, hasBias: false);
            q_norm = new RMSNorm(o.QLoraRank, o.NormEps);
            wq_b = nn.Linear(o.QLoraRank, _heads * qk, hasBias: false);
        }
        else wq = nn.Linear(o.DModel, _heads * qk, hasBias: false);
        wkv_a = nn.Linear(o.DModel, _kvRank + _rope, hasBias: false);
        kv_norm = new RMSNorm(_kvRank, o.NormEps);
        wkv_b = nn.Linear(_kvRank, _heads * (_nope + _v), hasBias: false);
        proj = nn.Linear(_heads * _v, o.DModel, hasBias: false);
        _scale = 1.0 / Math.Sqrt(qk);
        _ropeTables = rope;
        RegisterComponents();
    }

    /// <summary>The per-head queries, [B, H, T, nope] and [B, H, T, rope] (RoPE applied from position <paramref name="start"/>).</summary>
    private (Tensor Nope, Tensor Pe) Queries(Tensor x, long start)
    {
        long b = x.shape[0], t = x.shape[1];
        var q = wq is not null ? wq.forward(x) : wq_b!.forward(q_norm!.forward(wq_a!.forward(x)));
        q = q.view(b, t, _heads, _nope + _rope).transpose(1, 2);
        return (q.narrow(-1, 0, _nope), _ropeTables.Apply(q.narrow(-1, _nope, _rope), start));
    }

    /// <summary>The latent c_KV [B, T, kv-lora-rank] (normed) and the shared RoPE key [B, 1, T, rope].</summary>
    private (Tensor Latent, Tensor KeyPe) Latent(Tensor x, long start)
    {
        var kv = wkv_a.forward(x);
        var latent = kv_norm.forward(kv.narrow(-1, 0, _kvRank));
        return (latent, _ropeTables.Apply(kv.narrow(-1, _kvRank, _rope).unsqueeze(1), start));
    }

    /// <summary>The plain form: every head's key and value rebuilt from the latent, then causal attention.</summary>
    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        long b = x.shape[0], t = x.shape[1];
        var (qNope, qPe) = Queries(x, 0);
        var (latent, kPe) = Latent(x, 0);
        var kv = wkv_b.forward(latent).view(b, t, _heads, _nope + _v).transpose(1, 2); // [B, H, T, nope + v]
        var k = cat(new[] { kv.narrow(-1, 0, _nope), kPe.expand(b, _heads, t, _rope) }, -1);
        var q = cat(new[] { qNope, qPe }, -1);
        // scaled_dot_product_attention's default scale is 1/sqrt(q's last dim) = 1/sqrt(nope + rope), V3's.
        var y = nn.functional.scaled_dot_product_attention(q, k, kv.narrow(-1, _nope, _v), is_casual: true);
        return proj.forward(y.transpose(1, 2).reshape(b, t, _heads * _v)).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// The absorbed form over the compressed cache: scores <c>(q_nope W_UK) · c_KV + q_pe · k_pe</c>, output
    /// <c>(softmax · c_KV) W_UVᵀ</c>, then <c>proj</c>. The same maths as <see cref="forward"/> by associativity
    /// (q_nope · (W_UK c) = (q_nope W_UK) · c), so the logits agree within float rounding.
    /// </summary>
    public Tensor ForwardCached(Tensor x, KvCache.Layer cache)
    {
        ArgumentNullException.ThrowIfNull(cache);
        using var scope = NewDisposeScope();
        long b = x.shape[0], t = x.shape[1], start = cache.Length;
        if (t > 1 && start > 0) throw new ArgumentException($"{t} rows after {start} cached ones: several rows go only into an empty cache", nameof(x));
        var (qNope, qPe) = Queries(x, start);
        var (latent, kPe) = Latent(x, start);
        var (c, pe) = cache.Append(latent.unsqueeze(1), kPe);           // [B, 1, S, kv-lora-rank], [B, 1, S, rope]
        var w = wkv_b.weight!.view(_heads, _nope + _v, _kvRank);
        var qLatent = qNope.matmul(w.narrow(1, 0, _nope));              // [B, H, T, nope] @ [H, nope, r] = [B, H, T, r]
        var scores = qLatent.matmul(c.transpose(-2, -1)).Plus(qPe.matmul(pe.transpose(-2, -1))).mul_(Scalars.Of(_scale)); // [B, H, T, S]
        if (t > 1)
        {
            // The prompt into an empty cache: S = T, position i sees 0..i.
            using var future = ones(t, t, ScalarType.Bool, x.device).triu_(1);
            scores.masked_fill_(future, Scalars.Of(double.NegativeInfinity));
        }
        var outLatent = scores.softmax(-1).matmul(c);                   // [B, H, T, r]
        var y = outLatent.matmul(w.narrow(1, _nope, _v).transpose(-2, -1)); // [B, H, T, r] @ [H, r, v] = [B, H, T, v]
        return proj.forward(y.transpose(1, 2).reshape(b, t, _heads * _v)).MoveToOuterDisposeScope();
    }

    /// <summary>The compressed cache: c_KV [B, 1, context, kv-lora-rank] and the RoPE key [B, 1, context, rope].</summary>
    public KvCache.Layer NewCacheLayer(int batch, int context, ScalarType dtype, Device device)
        => new(batch, 1, context, _kvRank, _rope, dtype, device);
}
