using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using static TorchSharp.torch;

namespace ElasticMoE.Native;

/// <summary>
/// A CPU tensor's elements in place, for the kernels that loop over raw memory (router, row kernels, SwiGLU
/// elementwise steps, AdamW). The tensor must be contiguous (TorchSharp's <c>bytes</c> refuses any other); one of no
/// elements gives an empty span or a null pointer. Callers check the dtype and device they expect.
/// </summary>
internal static unsafe class TensorMemory
{
    public static Span<T> Span<T>(Tensor t) where T : unmanaged
        => t.numel() == 0 ? [] : MemoryMarshal.Cast<byte, T>(t.bytes);

    public static T* Pointer<T>(Tensor t) where T : unmanaged
        => t.numel() == 0 ? null : (T*)Unsafe.AsPointer(ref MemoryMarshal.GetReference(t.bytes));
}
