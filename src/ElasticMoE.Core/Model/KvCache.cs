using static TorchSharp.torch;

namespace ElasticMoE.Model;

/// <summary>
/// What every attention layer keeps of the tokens a sequence has seen so far (MHA: each head's key and value;
/// MLA: the joint latent and the shared RoPE key), so that
/// generating a token costs one row through the model instead of the whole sequence again.
/// </summary>
/// <remarks>
/// Preallocated to the model's context and filled in place: appending a row is one copy into a slice,
/// not a concatenation that reallocates the whole cache every token. The keys are stored after RoPE, at
/// their absolute positions, which is why a cache holds at most <c>context</c> positions (the RoPE
/// tables end there) and a longer text restarts it (<see cref="Inference.ContextWindow"/>).
/// </remarks>
public sealed class KvCache : IDisposable
{
    private readonly Layer[] _layers;

    /// <param name="layers">One cache layer per attention layer, as that attention shapes it (<see cref="IAttention.NewCacheLayer"/>).</param>
    public KvCache(IEnumerable<Layer> layers)
    {
        _layers = layers.ToArray();
        if (_layers.Length == 0) throw new ArgumentException("a KV cache needs at least one layer", nameof(layers));
    }

    public Layer this[int layer] => _layers[layer];

    /// <summary>Positions cached (the same in every layer after a whole forward).</summary>
    public long Length => _layers[0].Length;

    /// <summary>Positions the cache can hold: the model's context.</summary>
    public long Capacity => _layers[0].Capacity;

    /// <summary>Elements kept per token and layer (the first layer's: every layer has the same attention).</summary>
    public long ElementsPerToken => _layers[0].ElementsPerToken;

    /// <summary>Forgets every position (the buffers stay allocated).</summary>
    public void Clear()
    {
        foreach (var l in _layers) l.Length = 0;
    }

    public void Dispose()
    {
        foreach (var l in _layers) l.Dispose();
    }

    /// <summary>
    /// One attention layer's two tensors per position, [B, H, context, kDim] and [B, H, context, vDim]; the first
    /// <see cref="Length"/> positions are valid. MHA: keys and values of every head; MLA (H = 1): the latent c_KV
    /// and the RoPE key.
    /// </summary>
    public sealed class Layer : IDisposable
    {
        private readonly Tensor _k, _v;

        public Layer(int batch, int heads, int context, int kDim, int vDim, ScalarType dtype, Device device)
        {
            _k = zeros([batch, heads, context, kDim], dtype, device);
            _v = zeros([batch, heads, context, vDim], dtype, device);
            Capacity = context;
            ElementsPerToken = (long)heads * (kDim + vDim);
        }

        public long Length { get; internal set; }
        public long Capacity { get; }

        /// <summary>Elements kept per position of one sequence.</summary>
        public long ElementsPerToken { get; }

        /// <summary>Writes k [B, H, T, kDim] and v [B, H, T, vDim] after the cached positions; returns views of all positions cached now.</summary>
        /// <exception cref="InvalidOperationException">The rows do not fit in the context.</exception>
        public (Tensor K, Tensor V) Append(Tensor k, Tensor v)
        {
            long t = k.shape[2];
            if (Length + t > Capacity) throw new InvalidOperationException($"the KV cache holds {Capacity} positions; {Length} cached + {t} new do not fit");
            using (no_grad())
            {
                using var ks = _k.narrow(2, Length, t);
                using var vs = _v.narrow(2, Length, t);
                ks.copy_(k);
                vs.copy_(v);
            }
            Length += t;
            return (_k.narrow(2, 0, Length), _v.narrow(2, 0, Length));
        }

        public void Dispose()
        {
            _k.Dispose();
            _v.Dispose();
        }
    }
}
