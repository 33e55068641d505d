using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ElasticMoE.Model;

/// <summary>Root-mean-square layer norm (no mean subtraction, no bias).</summary>
public sealed class RMSNorm : nn.Module<Tensor, Tensor>
{
    private readonly Parameter weight;
    private readonly double _eps;

    public RMSNorm(int dim, double eps) : base(nameof(RMSNorm))
    {
        weight = new Parameter(ones(dim));
        _eps = eps;
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        // x * x, not square(): TorchSharp's square() is pow(2) with an implicit Scalar that a GC on another
        // thread can free mid-op (GcPressureTests caught it: "INTERNAL ASSERT FAILED at Scalar.h").
        var rms = x.mul(x).mean(new long[] { -1 }, keepdim: true).add_(Scalars.Of(_eps), Scalars.One).rsqrt_();
        return (x * rms * weight).MoveToOuterDisposeScope();
    }
}

/// <summary>SwiGLU feed-forward: w2(silu(w1 x) * w3 x). Used for dense FFNs and for every expert.</summary>
public sealed class SwiGLU : nn.Module<Tensor, Tensor>
{
    private readonly Linear w1, w3, w2;

    public SwiGLU(int dim, int hidden) : base(nameof(SwiGLU))
    {
        w1 = nn.Linear(dim, hidden, hasBias: false);
        w3 = nn.Linear(dim, hidden, hasBias: false);
        w2 = nn.Linear(hidden, dim, hasBias: false);
        Dim = dim;
        Hidden = hidden;
        RegisterComponents();
    }

    /// <summary>Model width d (the weights' shapes never change; asking a tensor its shape costs ~1 µs a call).</summary>
    public int Dim { get; }
    /// <summary>Hidden width H.</summary>
    public int Hidden { get; }

    /// <summary>Gate projection weight [hidden, dim].</summary>
    public Tensor W1 => w1.weight!;
    /// <summary>Up projection weight [hidden, dim].</summary>
    public Tensor W3 => w3.weight!;
    /// <summary>Down projection weight [dim, hidden].</summary>
    public Tensor W2 => w2.weight!;

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        return w2.forward(nn.functional.silu(w1.forward(x)) * w3.forward(x)).MoveToOuterDisposeScope();
    }
}

/// <summary>Rotary position embedding tables, shared by every attention layer.</summary>
public sealed class Rope : IDisposable
{
    public Tensor Cos { get; private set; }
    public Tensor Sin { get; private set; }

    public void MoveTo(Device device)
    {
        if (Cos.device == device) return;
        var (c, s) = (Cos, Sin);
        Cos = c.to(device);
        Sin = s.to(device);
        c.Dispose();
        s.Dispose();
    }

    public Rope(int headDim, int context, double theta, Device device, ScalarType dtype)
    {
        using var scope = NewDisposeScope();
        var half = headDim / 2;
        using var halfS = ((long)half).ToScalar();
        using var contextS = ((long)context).ToScalar();
        using var exponentScale = (-2.0 / headDim).ToScalar();
        var inv = pow(tensor(theta, dtype: ScalarType.Float64), arange(Scalars.Zero, halfS, Scalars.One, dtype: ScalarType.Float64).mul(exponentScale));
        var t = arange(Scalars.Zero, contextS, Scalars.One, dtype: ScalarType.Float64);
        var freqs = outer(t, inv);                     // [T, half]
        var emb = cat(new[] { freqs, freqs }, -1);     // [T, hd]
        Cos = emb.cos().to(dtype, device).MoveToOuterDisposeScope();
        Sin = emb.sin().to(dtype, device).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Rotates x of shape [B, H, T, hd] by position (the "rotate half" form): its T rows are at positions
    /// <paramref name="start"/> … start + T − 1 (a KV-cached step starts where the cache ends).
    /// </summary>
    public Tensor Apply(Tensor x, long start = 0)
    {
        using var scope = NewDisposeScope();
        long t = x.shape[2], half = x.shape[3] / 2;
        var cos = Cos.narrow(0, start, t).to(x.dtype);
        var sin = Sin.narrow(0, start, t).to(x.dtype);
        var x1 = x.narrow(-1, 0, half);
        var x2 = x.narrow(-1, half, half);
        var rotated = cat(new[] { -x2, x1 }, -1);
        return (x * cos).Plus(rotated * sin).MoveToOuterDisposeScope();
    }

    public void Dispose()
    {
        Cos.Dispose();
        Sin.Dispose();
    }
}

/// <summary>A block's attention: the training forward (a module's) and inference with a cache of its own shape.</summary>
public interface IAttention
{
    /// <summary>
    /// x [B, T, d] are the tokens after the <see cref="KvCache.Layer.Length"/> cached ones: what the attention keeps
    /// of them is appended to <paramref name="cache"/> and their queries attend to every cached position. Several
    /// rows at once only into an empty cache (the prompt).
    /// </summary>
    Tensor ForwardCached(Tensor x, KvCache.Layer cache);

    /// <summary>An empty cache layer for <paramref name="batch"/> sequences of up to <paramref name="context"/> tokens.</summary>
    KvCache.Layer NewCacheLayer(int batch, int context, ScalarType dtype, Device device);
}

/// <summary>Causal multi-head self-attention with RoPE.</summary>
public sealed class CausalSelfAttention : nn.Module<Tensor, Tensor>, IAttention
{
    private readonly Linear qkv, proj;
    private readonly int _heads;
    [NonSerialized] private readonly Rope _rope;

    public CausalSelfAttention(int dim, int heads, Rope rope) : base(nameof(CausalSelfAttention))
    {
        qkv = nn.Linear(dim, 3 * dim, hasBias: false);
        proj = nn.Linear(dim, dim, hasBias: false);
        _heads = heads;
        _rope = rope;
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        long b = x.shape[0], t = x.shape[1], d = x.shape[2], hd = d / _heads;
        var parts = qkv.forward(x).view(b, t, 3, _heads, hd).permute(2, 0, 3, 1, 4); // [3, B, H, T, hd]
        var q = _rope.Apply(parts[0]);
        var k = _rope.Apply(parts[1]);
        var v = parts[2];
        var y = nn.functional.scaled_dot_product_attention(q, k, v, is_casual: true);
        y = y.transpose(1, 2).reshape(b, t, d);
        return proj.forward(y).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Inference with a KV cache: x [B, T, d] are the tokens after the <see cref="KvCache.Layer.Length"/> ones
    /// cached; their keys and values are appended to <paramref name="cache"/> and their queries attend to every
    /// cached position. The same maths as <see cref="forward"/> on the whole sequence, one new row at a time.
    /// </summary>
    /// <remarks>
    /// Several rows at once only into an empty cache (the prompt): then the causal mask of <see cref="forward"/>
    /// is the right one. Several rows after cached ones would need a mask offset by the cache length, which
    /// scaled_dot_product_attention's <c>is_causal</c> does not do (it aligns the mask top-left).
    /// </remarks>
    public Tensor ForwardCached(Tensor x, KvCache.Layer cache)
    {
        using var scope = NewDisposeScope();
        long b = x.shape[0], t = x.shape[1], d = x.shape[2], hd = d / _heads, start = cache.Length;
        if (t > 1 && start > 0) throw new ArgumentException($"{t} rows after {start} cached ones: several rows go only into an empty cache", nameof(x));
        var parts = qkv.forward(x).view(b, t, 3, _heads, hd).permute(2, 0, 3, 1, 4); // [3, B, H, T, hd]
        var q = _rope.Apply(parts[0], start);
        var (k, v) = cache.Append(_rope.Apply(parts[1], start), parts[2]);
        var y = nn.functional.scaled_dot_product_attention(q, k, v, is_casual: t > 1);
        y = y.transpose(1, 2).reshape(b, t, d);
        return proj.forward(y).MoveToOuterDisposeScope();
    }

    /// <summary>Every head's key and value: [B, heads, context, head-dim] each.</summary>
    public KvCache.Layer NewCacheLayer(int batch, int context, ScalarType dtype, Device device)
    {
        int hd = (int)proj.weight!.shape[0] / _heads;
        return new KvCache.Layer(batch, _heads, context, hd, hd, dtype, device);
    }
}
