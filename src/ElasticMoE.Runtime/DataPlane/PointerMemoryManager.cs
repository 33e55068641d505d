using System.Buffers;

namespace ElasticMoE.Runtime.DataPlane;

/// <summary>
/// A <see cref="Memory{T}"/> over memory that does not move: a pinned array or a libtorch tensor's storage.
/// </summary>
/// <remarks>
/// Socket.SendAsync takes Memory, and a tensor's storage is native: wrapping the pointer is what lets a
/// tensor go onto the socket with no copy at all. The owner must keep the memory alive and in place for as
/// long as the Memory is used; every use here is scoped to one awaited send.
/// </remarks>
internal sealed unsafe class PointerMemoryManager<T>(void* pointer, int length) : MemoryManager<T> where T : unmanaged
{
    public override Span<T> GetSpan() => new(pointer, length);

    public override MemoryHandle Pin(int elementIndex = 0)
    {
        ArgumentOutOfRangeException.ThrowIfGreaterThan((uint)elementIndex, (uint)length, nameof(elementIndex));
        return new MemoryHandle((T*)pointer + elementIndex);
    }

    public override void Unpin() { }

    protected override void Dispose(bool disposing) { }
}
