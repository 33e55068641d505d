using static TorchSharp.torch;

namespace ElasticMoE.Model;

/// <summary>
/// The keys and values of every attention layer for the tokens a sequence has seen so far, so that
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

    public KvCache(int layers, int batch, int heads, int context, int headDim, ScalarType dtype, Device device)
    {
        _layers = new Layer[layers];
        for (int i = 0; i < layers; i++) _layers[i] = new Layer(batch, heads, context, headDim, dtype, device);
    }

    public Layer this[int layer] => _layers[layer];

    /// <summary>Positions cached (the same in every layer after a whole forward).</summary>
    public long Length => _layers[0].Length;

    /// <summary>Positions the cache can hold: the model's context.</summary>
    public long Capacity => _layers[0].Capacity;

    /// <summary>Forgets every position (the buffers stay allocated).</summary>
    public void Clear()
    {
        foreach (var l in _layers) l.Length = 0;
    }

    public void Dispose()
    {
        foreach (var l in _layers) l.Dispose();
    }

    /// <summary>One attention layer's keys and values, [B, H, context, hd] each; the first <see cref="Length"/> positions are valid.</summary>
    public sealed class Layer : IDisposable
    {
        private readonly Tensor _k, _v;

        internal Layer(int batch, int heads, int context, int headDim, ScalarType dtype, Device device)
        {
            _k = zeros([batch, heads, context, headDim], dtype, device);
            _v = zeros([batch, heads, context, headDim], dtype, device);
            Capacity = context;
        }

        public long Length { get; internal set; }
        public long Capacity { get; }

        /// <summary>Writes k and v [B, H, T, hd] after the cached positions; returns views of all positions cached now.</summary>
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
