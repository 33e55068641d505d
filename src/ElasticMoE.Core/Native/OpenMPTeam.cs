using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using static TorchSharp.torch;

namespace ElasticMoE.Native;

/// <summary>
/// Runs independent pieces of tensor work side by side on libtorch's own OpenMP team: the calling thread and
/// the OpenMP workers that libtorch's intra-op parallelism already uses, each piece single-threaded.
/// </summary>
/// <remarks>
/// <para>Why: a 256-row expert GEMM is too small for libtorch to split well across the cores (2-core VM: eight
/// experts × 256 rows plus a 1,024-row shared expert, forward + backward, 11–12 ms on one thread and only
/// 7–10 ms with two intra-op threads), while whole experts side by side, one per core, scale almost
/// linearly. Why this team and not threads of our own: our threads would compete with libtorch's OpenMP
/// workers, which spin for a while after every parallel op (measured: a pool of our own lost a third of its
/// speed-up to them), and this team is exactly the cores the process was given (<c>threads</c>).</para>
/// <para>How: <c>GOMP_parallel</c> of the libgomp libtorch is linked against (found in this process's
/// mappings, so it is the same instance) with a managed callback. Inside a parallel region libtorch runs
/// every op single-threaded (<c>at::in_parallel_region</c>), and MKL too (no nested parallelism), so a piece
/// computes the same bits on any thread of any team. A caller with one thread gets a team of one, whose
/// ops run single-threaded as well. Without libgomp (not Linux) the pieces run one after the other on the
/// caller.</para>
/// </remarks>
internal static unsafe class OpenMPTeam
{
    private static readonly delegate* unmanaged<delegate* unmanaged<IntPtr, void>, IntPtr, uint, uint, void> GompParallel;

    static OpenMPTeam()
    {
        var lib = LoadedLibrary.Open("libgomp");
        if (lib != IntPtr.Zero && NativeLibrary.TryGetExport(lib, "GOMP_parallel", out var fn))
            GompParallel = (delegate* unmanaged<delegate* unmanaged<IntPtr, void>, IntPtr, uint, uint, void>)fn;
    }

    /// <summary>Whether pieces run on the OpenMP team (false: one after the other on the caller).</summary>
    public static bool Available => GompParallel != null;

    /// <summary>
    /// Runs <paramref name="body"/>(0 … <paramref name="count"/> − 1), each index once, on the caller's OpenMP
    /// team, picked up in index order (put the longest first); returns when all are done. Grad mode is off in
    /// every piece. The first exception is rethrown here, and no piece starts after it.
    /// </summary>
    public static void Run(int count, Action<int> body)
    {
        if (count == 0) return;
        var work = new Work(count, body);
        // Through the team even for one piece: run on the caller outside a region, its ops would spread over
        // the cores and round differently from the same piece beside others.
        if (!Available)
        {
            work.Drain();
        }
        else
        {
            var handle = GCHandle.Alloc(work);
            try
            {
                GompParallel(&Entry, GCHandle.ToIntPtr(handle), 0, 0);
            }
            finally
            {
                handle.Free();
            }
        }
        if (work.Error is { } e) System.Runtime.ExceptionServices.ExceptionDispatchInfo.Capture(e).Throw();
    }

    [UnmanagedCallersOnly]
    private static void Entry(IntPtr data) => ((Work)GCHandle.FromIntPtr(data).Target!).Drain();

    private sealed class Work(int count, Action<int> body)
    {
        private int _next;
        public Exception? Error;

        // Never lets an exception out: this runs under native frames.
        [MethodImpl(MethodImplOptions.NoInlining)]
        public void Drain()
        {
            try
            {
                using var noGrad = no_grad(); // grad mode is per thread; the team's workers have it on
                for (int i = Interlocked.Increment(ref _next) - 1; i < count; i = Interlocked.Increment(ref _next) - 1)
                    body(i);
            }
            catch (Exception e)
            {
                Interlocked.CompareExchange(ref Error, e, null);
                Volatile.Write(ref _next, count); // the others stop taking pieces
            }
        }
    }
}
