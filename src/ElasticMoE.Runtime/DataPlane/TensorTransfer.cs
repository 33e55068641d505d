using ElasticMoE.Training;
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
    /// <summary>
    /// Sends <paramref name="tensor"/>'s values, dtype and shape. Completes when the bytes are handed to the
    /// kernel (or the send failed or was cancelled).
    /// </summary>
    /// <remarks>
    /// <para>
    /// The caller may dispose <paramref name="tensor"/> as soon as this returns, without awaiting: before
    /// returning, the send takes its own handle on the tensor's storage (a detached alias, no copy), which
    /// keeps libtorch from freeing that memory until the socket has read it, and which is released when the
    /// send completes, fails or is cancelled. Why an alias and not a copy: a copy costs a pass over the bytes
    /// and a buffer per send, and the point of sending from storage is that there is none.
    /// </para>
    /// <para>
    /// What the alias does not do is freeze the values: writing into the tensor in place (<c>add_</c>,
    /// an optimizer step) before the returned task completes may change what is sent. Await it first.
    /// </para>
    /// </remarks>
    public static async Task SendAsync(this DataPlaneNode node, string peerEndpoint, Int128 tag, Tensor tensor,
        Compression compression = Compression.None, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(node);
        ArgumentNullException.ThrowIfNull(tensor);
        var elementType = ToElementType(tensor.dtype);
        if (compression == Compression.BFloat16 && elementType != ElementType.Float32)
            throw new ArgumentException($"bfloat16 compression applies to float32 tensors, not {tensor.dtype}.", nameof(compression));
        // Everything up to the first await runs before this method returns to the caller: the owned handle
        // exists before the caller can dispose the original.
        using var owned = OwnedDenseCpu(tensor);
        var shape = owned.shape;
        if (compression == Compression.BFloat16)
        {
            // Compression writes a new buffer anyway, so reading the storage through a span is free.
            await node.SendAsync(peerEndpoint, tag, StorageAsFloats(owned), shape, compression, cancellationToken).ConfigureAwait(false);
            return;
        }
        await SendStorageAsync(node, peerEndpoint, tag, owned, elementType, shape, cancellationToken).ConfigureAwait(false);
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

    /// <summary>
    /// The canonical sum of the group's partials into a contiguous CPU float32 tensor (see
    /// <see cref="CollectiveGroup.TreeAllReduceAsync"/>); the partials are contiguous CPU float32 tensors of its size.
    /// </summary>
    public static async Task TreeAllReduceAsync(this CollectiveGroup group, Tensor result, IReadOnlyList<(TreeNode Node, Tensor Value)> partials,
        IReadOnlyList<(int Lo, int Hi)> ranges, int leaves, long collectiveId, CancellationToken cancellationToken = default)
    {
        CheckInPlaceTarget(result, nameof(result));
        foreach (var (_, value) in partials) CheckInPlaceTarget(value, nameof(partials));
        if (result.dtype != ScalarType.Float32 || partials.Any(p => p.Value.dtype != ScalarType.Float32))
            throw new ArgumentException("The tree all-reduce sums float32 tensors.", nameof(result));
        try
        {
            await group.TreeAllReduceAsync(StorageAsFloats(result), partials.Select(p => (p.Node, StorageAsFloats(p.Value))).ToList(),
                ranges, leaves, collectiveId, cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            GC.KeepAlive(result);
            GC.KeepAlive(partials);
        }
    }

    public static ElementType ToElementType(ScalarType type)
    {
        var code = (ElementType)(byte)type;
        return ElementTypes.IsKnown(code) ? code : throw new NotSupportedException($"The data plane does not carry {type} tensors.");
    }

    public static ScalarType ToScalarType(ElementType type) =>
        ElementTypes.IsKnown(type) ? (ScalarType)(byte)type : throw new NotSupportedException($"Unknown element type {type}.");

    /// <summary>
    /// A handle of the send's own on dense CPU values equal to <paramref name="tensor"/>'s: an alias of its
    /// storage when it already is a contiguous CPU tensor, else a contiguous CPU copy.
    /// </summary>
    /// <remarks>
    /// Detached (no autograd history is recorded for a send) and taken out of any dispose scope: the
    /// caller's scope may end while the send is still writing, and must not free the storage under it.
    /// </remarks>
    private static Tensor OwnedDenseCpu(Tensor tensor)
    {
        var owned = tensor.detach();
        try
        {
            owned = Replace(owned, owned.device_type == DeviceType.CPU ? owned : owned.cpu());
            owned = Replace(owned, owned.is_contiguous() ? owned : owned.contiguous());
            return owned.DetachFromDisposeScope();
        }
        catch
        {
            owned.Dispose();
            throw;
        }

        static Tensor Replace(Tensor old, Tensor next)
        {
            if (!ReferenceEquals(old, next)) old.Dispose();
            return next;
        }
    }

    private static void CheckInPlaceTarget(Tensor tensor, string name)
    {
        ArgumentNullException.ThrowIfNull(tensor, name);
        if (tensor.device_type != DeviceType.CPU) throw new ArgumentException("In-place data-plane operations need a CPU tensor.", name);
        if (!tensor.is_contiguous()) throw new ArgumentException("In-place data-plane operations need a contiguous tensor.", name);
    }

    private static Task SendStorageAsync(DataPlaneNode node, string peer, Int128 tag, Tensor dense, ElementType elementType, long[] shape,
        CancellationToken cancellationToken)
    {
        var bytes = dense.numel() * ElementTypes.SizeOf(elementType);
        if (bytes == 0) return node.SendAsync(peer, tag, ReadOnlyMemory<byte>.Empty, elementType, shape, cancellationToken);
        unsafe
        {
            // Native storage never moves, so the pointer stays valid for as long as the tensor lives: the
            // caller (SendAsync above) holds its own handle until the returned task completes.
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
