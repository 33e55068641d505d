using System.Buffers;
using System.Net.Sockets;

namespace ElasticMoE.Runtime.DataPlane;

/// <summary>This node's one connection to a peer, shared by every sender to that peer.</summary>
internal sealed class OutgoingConnection : IDisposable
{
    // Below this a payload is copied next to its header and sent in one call: one syscall and one TCP
    // segment beat a copy of a few kilobytes. Above it the copy would cost more than the extra send.
    private const int CoalesceBelowBytes = 64 << 10;

    private readonly Socket _socket;
    private readonly SemaphoreSlim _sendLock = new(1, 1);
    private readonly byte[] _header = new byte[FrameHeader.Size];
    private readonly Action<OutgoingConnection, string, Exception?> _onClosed;
    private int _closed;

    public OutgoingConnection(string peer, Socket socket, Action<OutgoingConnection, string, Exception?> onClosed)
    {
        Peer = peer;
        _socket = socket;
        _onClosed = onClosed;
        _ = WatchForCloseAsync();
    }

    public string Peer { get; }

    public bool IsClosed => Volatile.Read(ref _closed) != 0;

    /// <summary>Writes one frame. Frames from concurrent callers never interleave.</summary>
    /// <remarks>
    /// Cancellation while waiting for the connection is harmless; once bytes of a frame are on the wire,
    /// stopping would leave the peer mid-frame, so then the connection is closed instead (the next send
    /// opens a fresh one).
    /// </remarks>
    public async Task SendAsync(FrameHeader header, ReadOnlyMemory<byte> payload, CancellationToken cancellationToken)
    {
        await _sendLock.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            if (IsClosed) throw new IOException($"The data-plane connection to {Peer} is closed.");
            if (payload.Length < CoalesceBelowBytes)
            {
                var buffer = ArrayPool<byte>.Shared.Rent(FrameHeader.Size + payload.Length);
                try
                {
                    header.Write(buffer);
                    payload.Span.CopyTo(buffer.AsSpan(FrameHeader.Size));
                    await SendAllAsync(buffer.AsMemory(0, FrameHeader.Size + payload.Length), cancellationToken).ConfigureAwait(false);
                }
                finally
                {
                    ArrayPool<byte>.Shared.Return(buffer);
                }
            }
            else
            {
                header.Write(_header);
                await SendAllAsync(_header, cancellationToken).ConfigureAwait(false);
                await SendAllAsync(payload, cancellationToken).ConfigureAwait(false);
            }
        }
        catch (Exception ex)
        {
            Close($"send failed: {ex.GetBaseException().Message}", ex);
            throw;
        }
        finally
        {
            _sendLock.Release();
        }
    }

    private async ValueTask SendAllAsync(ReadOnlyMemory<byte> data, CancellationToken cancellationToken)
    {
        while (!data.IsEmpty)
        {
            var sent = await _socket.SendAsync(data, SocketFlags.None, cancellationToken).ConfigureAwait(false);
            data = data[sent..];
        }
    }

    // The peer never writes on this connection, so a read only ever completes when it closes (or breaks the
    // protocol). Noticing that now lets the next send reconnect instead of failing on a dead socket.
    private async Task WatchForCloseAsync()
    {
        var probe = new byte[1];
        try
        {
            var n = await _socket.ReceiveAsync(probe, SocketFlags.None).ConfigureAwait(false);
            Close(n == 0 ? "closed by peer" : "peer wrote on a send-only connection", null);
        }
        catch (Exception ex) when (ex is SocketException or ObjectDisposedException)
        {
            Close($"connection lost: {ex.Message}", ex is ObjectDisposedException ? null : ex);
        }
    }

    public void Close(string reason, Exception? exception)
    {
        if (Interlocked.Exchange(ref _closed, 1) != 0) return;
        try { _socket.Shutdown(SocketShutdown.Both); } catch (SocketException) { } catch (ObjectDisposedException) { }
        _socket.Dispose();
        _onClosed(this, reason, exception);
    }

    public void Dispose() => Close("node disposed", null);
}
