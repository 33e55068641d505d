using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace ElasticMoE.Native;

/// <summary>
/// General matrix multiply on raw row-major memory, through the MKL that libtorch itself calls for <c>mm</c>/<c>addmm</c>
/// (its Fortran <c>sgemm_</c>/<c>dgemm_</c>, exported by the <c>libtorch_cpu</c> this process loaded).
/// </summary>
/// <remarks>
/// <para>Why not <c>addmm_</c>: the expert kernel (<see cref="Model.SwiGLUChunks"/>) makes ~10 chunk GEMMs per layer and
/// micro-batch, each as a libtorch op with its views (<c>narrow</c>, <c>t</c>), its dispatch and, in the backward, its
/// allocations: ~16 libtorch calls per chunk, 2–7 µs each. On raw memory a chunk makes none. Same MKL routine, same
/// single thread inside the OpenMP team: MKL sees the enclosing parallel region and does not nest.</para>
/// <para>Found in this process's mappings, like libgomp in <see cref="OpenMPTeam"/>, so it is the MKL instance libtorch
/// uses. Where libtorch has no MKL (another platform's build), <see cref="Available"/> is false and the caller uses
/// libtorch ops instead.</para>
/// </remarks>
internal static unsafe class Blas
{
    private static readonly delegate* unmanaged<byte*, byte*, int*, int*, int*, float*, float*, int*, float*, int*, float*, float*, int*, void> Sgemm;
    private static readonly delegate* unmanaged<byte*, byte*, int*, int*, int*, double*, double*, int*, double*, int*, double*, double*, int*, void> Dgemm;

    static Blas()
    {
        var lib = LoadedLibrary.Open("libtorch_cpu");
        if (lib == IntPtr.Zero) return;
        if (NativeLibrary.TryGetExport(lib, "sgemm_", out var s) && NativeLibrary.TryGetExport(lib, "dgemm_", out var d))
        {
            Sgemm = (delegate* unmanaged<byte*, byte*, int*, int*, int*, float*, float*, int*, float*, int*, float*, float*, int*, void>)s;
            Dgemm = (delegate* unmanaged<byte*, byte*, int*, int*, int*, double*, double*, int*, double*, int*, double*, double*, int*, void>)d;
        }
    }

    /// <summary>Whether <see cref="Gemm{T}"/> can run here (libtorch with MKL's BLAS in this process).</summary>
    public static bool Available => Sgemm != null;

    /// <summary>
    /// Row-major C[m, n] = op(A) op(B) + beta C for float or double, where op(A) is [m, k]: A stored as [m, k]
    /// (or as [k, m] with <paramref name="transA"/>) with rows <paramref name="lda"/> elements apart, B likewise
    /// [k, n] (or [n, k]) with <paramref name="ldb"/>, C with <paramref name="ldc"/>. beta 0 ignores what C held.
    /// </summary>
    public static void Gemm<T>(bool transA, bool transB, int m, int n, int k, T* a, int lda, T* b, int ldb, T beta, T* c, int ldc)
        where T : unmanaged
    {
        if (m == 0 || n == 0) return;
        // Row-major C = op(A) op(B) is column-major Cᵀ = op(B)ᵀ op(A)ᵀ: the operands swap, the flags stay with them.
        byte tb = (byte)(transB ? 'T' : 'N'), ta = (byte)(transA ? 'T' : 'N');
        if (typeof(T) == typeof(float))
        {
            float one = 1f, fb = Unsafe.As<T, float>(ref beta);
            Sgemm(&tb, &ta, &n, &m, &k, &one, (float*)b, &ldb, (float*)a, &lda, &fb, (float*)c, &ldc);
        }
        else if (typeof(T) == typeof(double))
        {
            double one = 1d, db = Unsafe.As<T, double>(ref beta);
            Dgemm(&tb, &ta, &n, &m, &k, &one, (double*)b, &ldb, (double*)a, &lda, &db, (double*)c, &ldc);
        }
        else throw new NotSupportedException($"GEMM of {typeof(T).Name}");
    }
}
