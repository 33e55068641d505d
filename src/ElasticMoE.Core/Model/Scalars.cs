using System.Collections.Concurrent;
using TorchSharp;
using static TorchSharp.torch;

namespace ElasticMoE.Model;

/// <summary>
/// Scalars for tensor ops, kept alive for as long as libtorch may read them.
/// </summary>
/// <remarks>
/// Why: TorchSharp passes a Scalar's native handle to libtorch without keeping the managed Scalar
/// reachable, and an implicit conversion (<c>x * 0.5</c>, <c>x.pow(2)</c>, <c>arange(n)</c>) leaves
/// nothing else referencing it — nor does TorchSharp's own <c>a + b</c>, which is <c>add(b, 1)</c>. A garbage collection triggered by any other thread can then finalize
/// the Scalar while the op is still reading it: a wrong value or a libtorch assertion, at random. An
/// actor system allocates all the time, so in a cluster this happened (a crash in the middle of a
/// 2-node run; <c>GcPressureTests</c> reproduces it in a second). So: no implicit Scalars in our tensor
/// code — a constant of the config comes from <see cref="Of(double)"/> (cached for the process's life),
/// a value that changes per step is a <c>using var</c> local (alive until the end of its scope), and
/// a sum of tensors is <see cref="Plus"/> (<c>a - b</c> is fine: TorchSharp's <c>sub</c> takes no alpha).
/// </remarks>
public static class Scalars
{
    private static readonly ConcurrentDictionary<double, Scalar> Doubles = new();
    private static readonly ConcurrentDictionary<long, Scalar> Longs = new();

    /// <summary>A cached floating-point Scalar. Only for values fixed by the config: the cache never shrinks.</summary>
    public static Scalar Of(double value) => Doubles.GetOrAdd(value, static v => v.ToScalar());

    /// <summary>A cached integer Scalar (keeps integer tensors integer). Same rule as <see cref="Of(double)"/>.</summary>
    public static Scalar Of(long value) => Longs.GetOrAdd(value, static v => v.ToScalar());

    public static Scalar Zero => Of(0L);
    public static Scalar One => Of(1L);

    /// <summary><c>a + b</c> with a Scalar alpha that stays alive.</summary>
    public static Tensor Plus(this Tensor a, Tensor b) => a.add(b, One);
}
