using TorchSharp;
using static TorchSharp.torch;

namespace ElasticMoE.Runtime.DataPlane;

/// <summary>TorchSharp tensors on the data plane.</summary>
/// <remarks>
/// A contiguous CPU tensor is sent straight from its storage: the socket reads libtorch's memory, no managed
/// copy is made. Anything else (a GPU tensor, a strided view) is first made into a contiguous CPU copy,
/// because the wire format is dense row-major bytes.
/// </remarks>
public static class TensorTransfer
{
    public static async Task SendAsync(this DataPlaneNode node, string peerEndpoint, long tag, Tensor tensor,
        Compression compression = Compression.None, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(tensor);
        var elementType = ToElementType(tensor.dtype);
        if (compression == Compression.BFloat16 && elementType != ElementType.Float32)
            throw new ArgumentException($"bfloat16 compression applies to float32 tensors, not {tensor.dtype}.", nameof(compression));
        var dense = AsDenseCpu(tensor);
        try
        {
            var shape = dense.shape;
            if (compression == Compression.BFloat16)
            {
                // Compression writes a new buffer anyway, so reading the storage through a span is free.
                await node.SendAsync(peerEndpoint, tag, StorageAsFloats(dense), shape, compression, cancellationToken).ConfigureAwait(false);
                return;
            }
            await SendStorageAsync(node, peerEndpoint, tag, dense, elementType, shape, cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            if (!ReferenceEquals(dense, tensor)) dense.Dispose();
            GC.KeepAlive(tensor);
        }
    }

    /// <summary>A new CPU tensor holding the frame's values with its dtype and shape (one copy).</summary>
    public static Tensor ToTensor(this Frame frame)
    {
        ArgumentNullException.ThrowIfNull(frame);
        var tensor = empty(frame.Shape.ToArray(), ToScalarType(frame.ElementType), CPU);
        try
        {
            if (frame.Length > 0) frame.Span.CopyTo(tensor.bytes);
            return tensor;
        }
        catch
        {
            tensor.Dispose();
            throw;
        }
    }

    /// <summary>Copies the frame's values into an existing contiguous CPU tensor of the same dtype and element count.</summary>
    public static void CopyTo(this Frame frame, Tensor destination)
    {
        CheckInPlaceTarget(destination, nameof(destination));
        if (ToElementType(destination.dtype) != frame.ElementType || destination.numel() != frame.ElementCount)
            throw new ArgumentException($"Cannot copy {frame} into a {destination.dtype} tensor of {destination.numel()} elements.", nameof(destination));
        if (frame.Length > 0) frame.Span.CopyTo(destination.bytes);
    }

    /// <summary>
    /// Sums a contiguous CPU float32 tensor across the group, in place (see
    /// <see cref="CollectiveGroup.AllReduceSumAsync(Memory{float}, long, Compression, CancellationToken)"/>).
    /// </summary>
    public static async Task AllReduceSumAsync(this CollectiveGroup group, Tensor tensor, long collectiveId,
        Compression compression = Compression.None, CancellationToken cancellationToken = default)
    {
        CheckInPlaceTarget(tensor, nameof(tensor));
        if (tensor.dtype != ScalarType.Float32) throw new ArgumentException($"All-reduce sums float32 tensors, not {tensor.dtype}.", nameof(tensor));
        if (tensor.requires_grad && tensor.is_leaf)
            throw new ArgumentException("Reduce the .grad (or a detached tensor), not a leaf that requires grad.", nameof(tensor));
        try
        {
            await group.AllReduceSumAsync(StorageAsFloats(tensor), collectiveId, compression, cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            GC.KeepAlive(tensor);
        }
    }

    public static ElementType ToElementType(ScalarType type)
    {
        var code = (ElementType)(byte)type;
        return ElementTypes.IsKnown(code) ? code : throw new NotSupportedException($"The data plane does not carry {type} tensors.");
    }

    public static ScalarType ToScalarType(ElementType type) =>
        ElementTypes.IsKnown(type) ? (ScalarType)(byte)type : throw new NotSupportedException($"Unknown element type {type}.");

    private static Tensor AsDenseCpu(Tensor tensor)
    {
        var cpu = tensor.device_type == DeviceType.CPU ? tensor : tensor.cpu();
        if (cpu.is_contiguous()) return cpu;
        var dense = cpu.contiguous();
        if (!ReferenceEquals(cpu, tensor)) cpu.Dispose();
        return dense;
    }

    private static void CheckInPlaceTarget(Tensor tensor, string name)
    {
        ArgumentNullException.ThrowIfNull(tensor, name);
        if (tensor.device_type != DeviceType.CPU) throw new ArgumentException("In-place data-plane operations need a CPU tensor.", name);
        if (!tensor.is_contiguous()) throw new ArgumentException("In-place data-plane operations need a contiguous tensor.", name);
    }

    private static Task SendStorageAsync(DataPlaneNode node, string peer, long tag, Tensor dense, ElementType elementType, long[] shape,
        CancellationToken cancellationToken)
    {
        var bytes = dense.numel() * ElementTypes.SizeOf(elementType);
        if (bytes == 0) return node.SendAsync(peer, tag, ReadOnlyMemory<byte>.Empty, elementType, shape, cancellationToken);
        unsafe
        {
            // Native storage never moves, so the pointer stays valid for as long as the tensor lives.
            fixed (byte* data = dense.bytes)
                return node.SendUnmanagedAsync(peer, tag, data, bytes, elementType, shape, cancellationToken);
        }
    }

    private static unsafe Memory<float> StorageAsFloats(Tensor tensor)
    {
        var count = checked((int)tensor.numel());
        if (count == 0) return Memory<float>.Empty;
        fixed (byte* data = tensor.bytes)
            return new PointerMemoryManager<float>(data, count).Memory;
    }
}
