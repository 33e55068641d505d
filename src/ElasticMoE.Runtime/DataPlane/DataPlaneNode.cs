using System.Buffers;
using System.Collections.Concurrent;
using System.Net;
using System.Net.Sockets;
using System.Runtime.InteropServices;

namespace ElasticMoE.Runtime.DataPlane;

/// <summary>
/// Moves tensor bytes between cluster nodes: one per node, listening on a TCP port, dialling peers on first
/// use, and delivering received frames by tag.
/// </summary>
/// <remarks>
/// <para>
/// Why plain <see cref="Socket"/>s and not Akka.Remote or Akka.Streams TCP: Akka.Remote caps frames at 128 kB
/// and shares its one connection with cluster heartbeats, so a 64 MB gradient would delay failure detection.
/// Akka.Streams TCP hands data over as <c>ByteString</c> chunks, which would have to be copied into a
/// contiguous buffer again and cost an allocation and a stage hop per chunk. Here the reader receives
/// straight into the pooled buffer the consumer gets, and the sender hands the caller's memory (or a
/// tensor's storage) directly to the kernel: the only copies are the kernel's own. Socket's async API
/// gives the flow control we need for free: a reader that stops reading makes the sender's writes wait.
/// </para>
/// <para>
/// Connections are one-way: this node writes only on connections it opened and reads only on those it
/// accepted. So each ordered pair of nodes has one connection, frames from one sender to one receiver stay
/// in order, and no handshake is needed to decide which of two simultaneous dials wins.
/// </para>
/// <para>
/// A broken peer affects only its own connection: bad magic, an unknown version, an inconsistent or oversize
/// header closes that connection, logs why, and the node goes on serving everyone else.
/// </para>
/// </remarks>
public sealed class DataPlaneNode : IAsyncDisposable, IDisposable
{
    private readonly DataPlaneOptions _options;
    private readonly Socket _listener;
    private readonly CancellationTokenSource _shutdown = new();
    private readonly TagMailboxes _mailboxes = new();
    private readonly FrameTally _frames = new();
    private readonly ConcurrentDictionary<string, Lazy<Task<OutgoingConnection>>> _outgoing = new(StringComparer.OrdinalIgnoreCase);
    private readonly ConcurrentDictionary<Socket, Task> _incoming = new();
    private readonly Task _acceptLoop;
    private long _protocolErrors;
    private long _bytesSent, _bytesReceived;
    private int _disposed;

    private DataPlaneNode(DataPlaneOptions options)
    {
        options.Validate();
        _options = options;
        var address = ResolveBindAddress(options.Host);
        _listener = new Socket(address.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
        try
        {
            _listener.Bind(new IPEndPoint(address, options.Port));
            _listener.Listen(128);
        }
        catch (SocketException e) when (e.SocketErrorCode is SocketError.AddressNotAvailable or SocketError.AddressAlreadyInUse or SocketError.AccessDenied)
        {
            _listener.Dispose();
            throw new global::ElasticMoE.Configuration.ConfigException($"elasticmoe.cluster.host: the data plane cannot listen on {options.Host}:{options.Port} ({e.Message}): " +
                (e.SocketErrorCode == SocketError.AddressNotAvailable
                    ? "it is not an address of this machine; bind one that is (or \"0.0.0.0\") and put what peers dial in cluster.public-host"
                    : "the port is taken or not allowed"));
        }
        catch
        {
            _listener.Dispose();
            throw;
        }
        LocalEndPoint = (IPEndPoint)_listener.LocalEndPoint!;
        Endpoint = PeerEndpoint.Format(options.AdvertisedHost ?? options.Host, LocalEndPoint.Port);
        _acceptLoop = Task.Run(AcceptLoopAsync);
    }

    private static IPAddress ResolveBindAddress(string host)
    {
        if (IPAddress.TryParse(host, out var address)) return address;
        var addresses = Dns.GetHostAddresses(host);
        return addresses.FirstOrDefault(a => a.AddressFamily == AddressFamily.InterNetwork) ?? addresses.FirstOrDefault()
            ?? throw new ArgumentException($"Data-plane host '{host}' resolves to no address.");
    }

    /// <summary>Binds and starts accepting.</summary>
    public static DataPlaneNode Start(DataPlaneOptions? options = null) => new(options ?? new DataPlaneOptions());

    /// <summary>"host:port" that peers dial to reach this node (the bound port when 0 was asked for).</summary>
    public string Endpoint { get; }

    public IPEndPoint LocalEndPoint { get; }

    public int NodeId => _options.NodeId;

    public long MaxFrameBytes => _options.MaxFrameBytes;

    /// <summary>Bytes of received frames waiting in mailboxes for a receiver.</summary>
    public long BufferedBytes => _mailboxes.BufferedBytes;

    public int IncomingConnectionCount => _incoming.Count;

    public int OutgoingConnectionCount =>
        _outgoing.Values.Count(l => l.IsValueCreated && l.Value.IsCompletedSuccessfully && !l.Value.Result.IsClosed);

    /// <summary>Bytes of whole frames (header and payload as on the wire) this node sent; <see cref="DataPlaneTraffic"/> sums every node's.</summary>
    public long BytesSent => Interlocked.Read(ref _bytesSent);

    /// <summary>Bytes of whole frames (header and payload as on the wire) this node received.</summary>
    public long BytesReceived => Interlocked.Read(ref _bytesReceived);

    /// <summary>Connections closed because their peer broke the framing protocol.</summary>
    public long ProtocolErrorCount => Interlocked.Read(ref _protocolErrors);

    /// <summary>Receives posted and still waiting for their frame. Cancelled receives are not counted: they leave at once.</summary>
    public int PendingReceiveCount => _mailboxes.WaitingCount;

    /// <summary>
    /// Frames received and dropped unread, their buffers returned to the pool: dropped by a <see cref="Fence"/>
    /// (buffered when it was raised or arriving later) or by <see cref="DiscardBuffered"/>.
    /// </summary>
    public long DroppedFrameCount => _mailboxes.DroppedCount;

    /// <summary>
    /// Frames this node received that are not yet disposed: buffered in mailboxes or held by a receiver.
    /// Once a step's frames are consumed it returns to what it was; a count that only grows is a leak.
    /// </summary>
    public long LiveFrameCount => _frames.Live;

    /// <summary>Fences raised and not yet lifted.</summary>
    public int FenceCount => _mailboxes.FenceCount;

    /// <summary>
    /// The next frame sent to this node with <paramref name="tag"/>, from any peer, whether it arrived
    /// before this call or arrives after. Frames with the same tag are handed out in arrival order.
    /// </summary>
    /// <remarks>
    /// <para>The caller owns the frame and should dispose it.</para>
    /// <para>
    /// Cancelling <paramref name="cancellationToken"/> removes the waiting receive at once, and the task ends
    /// cancelled. A frame arriving as the token is cancelled is not given to the cancelled receive; it waits
    /// for the next receive of its tag (or is dropped, if the tag is fenced). Only a receive that completed
    /// before the cancellation keeps its frame.
    /// </para>
    /// <para>
    /// A receive for a tag that is fenced, or becomes fenced while it waits, fails with
    /// <see cref="FencedTagException"/> (an <see cref="OperationCanceledException"/>).
    /// </para>
    /// </remarks>
    public Task<Frame> ReceiveAsync(Int128 tag, CancellationToken cancellationToken = default) =>
        _mailboxes.ReceiveAsync(tag, cancellationToken);

    /// <summary>
    /// Sends <paramref name="payload"/> to the node at <paramref name="peerEndpoint"/>. Completes when the
    /// bytes are handed to the kernel, not when the peer has read them.
    /// </summary>
    /// <param name="shape">Null = one dimension, payload length / element size.</param>
    public Task SendAsync(string peerEndpoint, Int128 tag, ReadOnlyMemory<byte> payload, ElementType elementType = ElementType.UInt8,
        long[]? shape = null, CancellationToken cancellationToken = default)
    {
        var header = MakeHeader(tag, elementType, Compression.None, payload.Length, shape);
        return SendFrameAsync(peerEndpoint, header, payload, cancellationToken);
    }

    /// <summary>Sends float32 values, optionally as bfloat16 (the receiver gets float32 back either way).</summary>
    public async Task SendAsync(string peerEndpoint, Int128 tag, ReadOnlyMemory<float> values, long[]? shape = null,
        Compression compression = Compression.None, CancellationToken cancellationToken = default)
    {
        if (compression is not (Compression.None or Compression.BFloat16)) throw new ArgumentOutOfRangeException(nameof(compression));
        if (compression == Compression.BFloat16)
        {
            var header = MakeHeader(tag, ElementType.Float32, Compression.BFloat16, (long)values.Length * 2, shape ?? [values.Length]);
            var buffer = BufferPool.Rent(values.Length * 2);
            try
            {
                BFloat16.Compress(values.Span, MemoryMarshal.Cast<byte, ushort>(buffer.AsSpan(0, values.Length * 2)));
                await SendFrameAsync(peerEndpoint, header, buffer.AsMemory(0, values.Length * 2), cancellationToken).ConfigureAwait(false);
            }
            finally
            {
                BufferPool.Return(buffer);
            }
        }
        else
        {
            var header = MakeHeader(tag, ElementType.Float32, Compression.None, (long)values.Length * 4, shape ?? [values.Length]);
            // Pinning lets the caller's floats go to the socket as bytes without a copy.
            using var pin = values.Pin();
            await SendFrameAsync(peerEndpoint, header, AsBytes(pin, values.Length * sizeof(float)), cancellationToken).ConfigureAwait(false);
        }
    }

    /// <summary>
    /// Sends the bytes at a fixed address (a tensor's storage). The socket may read them at any time until the
    /// returned task completes, so the caller must hold its own reference to the memory until then, not
    /// merely until this returns: <see cref="TensorTransfer.SendAsync"/> holds a detached alias of the tensor.
    /// </summary>
    internal unsafe Task SendUnmanagedAsync(string peerEndpoint, Int128 tag, void* data, long byteLength, ElementType elementType, long[] shape,
        CancellationToken cancellationToken)
    {
        if (byteLength > int.MaxValue) throw new ArgumentException($"Payload of {byteLength} bytes exceeds the frame limit.");
        var header = MakeHeader(tag, elementType, Compression.None, byteLength, shape);
        var memory = new PointerMemoryManager<byte>(data, (int)byteLength).Memory;
        return SendFrameAsync(peerEndpoint, header, memory, cancellationToken);
    }

    /// <summary>Opens the connection to a peer now rather than on the first send (to surface a bad address early).</summary>
    public async Task ConnectAsync(string peerEndpoint, CancellationToken cancellationToken = default) =>
        await GetConnectionAsync(peerEndpoint, cancellationToken).ConfigureAwait(false);

    /// <summary>
    /// Frees buffered frames whose tag matches: those of a collective that was abandoned (a member left
    /// mid-step) would otherwise hold memory and their connection's buffering budget for ever.
    /// </summary>
    /// <remarks>
    /// Only what is buffered now: a frame of the same tags still on the wire is buffered when it lands.
    /// To drop those too, raise a <see cref="Fence"/>.
    /// </remarks>
    public int DiscardBuffered(Func<Int128, bool> tagFilter) => _mailboxes.Discard(tagFilter);

    /// <summary>
    /// Drops every frame whose tag <paramref name="isStale"/> accepts, both those buffered now and those that
    /// arrive until the fence is lifted (dispose the returned fence), and fails receives of those tags with
    /// <see cref="FencedTagException"/>. Dropped frames' buffers go back to the pool and their bytes back to
    /// their connection's budget; they are counted in <see cref="DroppedFrameCount"/>.
    /// </summary>
    /// <remarks>
    /// <para>
    /// Why a fence and not just <see cref="DiscardBuffered"/>: when a step attempt is aborted, peers may
    /// still be sending its frames, and some are on the wire when the abort is decided. Discarding only what
    /// is buffered leaves those to land later and sit in a mailbox nobody will read, holding a pooled buffer
    /// and the connection's budget (enough of them stall the connection). A fence catches both.
    /// </para>
    /// <para>
    /// <paramref name="isStale"/> runs under the mailbox lock for every frame and receive while the fence is
    /// up: it must be quick, must not throw, and must not call back into this node. Tags of an aborted attempt
    /// are never reused (they carry the plan epoch), so a fence may stay up for the rest of the run; lift it
    /// when its tags can no longer be in flight, to keep the per-frame check short.
    /// </para>
    /// </remarks>
    public TagFence Fence(Func<Int128, bool> isStale)
    {
        ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed) != 0, this);
        var (id, dropped) = _mailboxes.AddFence(isStale);
        if (dropped > 0) Log(DataPlaneLogLevel.Debug, $"Data plane {Endpoint}: fence {id} dropped {dropped} buffered frames.", null);
        return new TagFence(_mailboxes, id, dropped);
    }

    private FrameHeader MakeHeader(Int128 tag, ElementType elementType, Compression compression, long wireLength, long[]? shape)
    {
        var size = ElementTypes.SizeOf(elementType);
        if (size == 0) throw new ArgumentException($"Unknown element type {elementType}.", nameof(elementType));
        if (wireLength > _options.MaxFrameBytes)
            throw new ArgumentException($"Payload of {wireLength} bytes exceeds the maximum frame size {_options.MaxFrameBytes}; split it.");
        if (shape is null)
        {
            if (wireLength % size != 0)
                throw new ArgumentException($"Payload of {wireLength} bytes is not a whole number of {elementType} elements.");
            shape = [wireLength / size];
        }
        var header = new FrameHeader
        {
            Tag = tag,
            Source = _options.NodeId,
            ElementType = elementType,
            Compression = compression,
            Shape = shape,
            PayloadLength = wireLength,
        };
        // The peer runs the same checks; failing here names the caller's mistake instead of a closed connection there.
        Span<byte> probe = stackalloc byte[FrameHeader.Size];
        header.Write(probe);
        if (!FrameHeader.TryParse(probe, _options.MaxFrameBytes, out _, out var error))
            throw new ArgumentException($"Invalid frame for tag {tag}: {error}.");
        return header;
    }

    private static unsafe ReadOnlyMemory<byte> AsBytes(MemoryHandle pin, int byteLength) =>
        byteLength == 0 ? ReadOnlyMemory<byte>.Empty : new PointerMemoryManager<byte>(pin.Pointer, byteLength).Memory;

    private async Task SendFrameAsync(string peerEndpoint, FrameHeader header, ReadOnlyMemory<byte> payload, CancellationToken cancellationToken)
    {
        var connection = await GetConnectionAsync(peerEndpoint, cancellationToken).ConfigureAwait(false);
        await connection.SendAsync(header, payload, cancellationToken).ConfigureAwait(false);
        long bytes = FrameHeader.Size + payload.Length;
        Interlocked.Add(ref _bytesSent, bytes);
        DataPlaneTraffic.Sent(bytes);
    }

    private async Task<OutgoingConnection> GetConnectionAsync(string peerEndpoint, CancellationToken cancellationToken)
    {
        ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed) != 0, this);
        for (var attempt = 0; ; attempt++)
        {
            var lazy = _outgoing.GetOrAdd(peerEndpoint, static (peer, self) =>
                new Lazy<Task<OutgoingConnection>>(() => self.ConnectCoreAsync(peer)), this);
            OutgoingConnection connection;
            try
            {
                connection = await lazy.Value.WaitAsync(cancellationToken).ConfigureAwait(false);
            }
            catch (Exception) when (lazy.Value.IsFaulted || lazy.Value.IsCanceled)
            {
                // Forget the failed dial so the next send tries again instead of replaying this error.
                _outgoing.TryRemove(KeyValuePair.Create(peerEndpoint, lazy));
                throw;
            }
            if (!connection.IsClosed) return connection;
            _outgoing.TryRemove(KeyValuePair.Create(peerEndpoint, lazy));
            if (attempt > 0) throw new IOException($"The data-plane connection to {peerEndpoint} closed as soon as it opened.");
        }
    }

    // Not tied to one caller's token: several senders may be waiting on the same dial.
    private async Task<OutgoingConnection> ConnectCoreAsync(string peerEndpoint)
    {
        using var timeout = CancellationTokenSource.CreateLinkedTokenSource(_shutdown.Token);
        timeout.CancelAfter(_options.ConnectTimeout);
        var target = await PeerEndpoint.ResolveAsync(peerEndpoint, timeout.Token).ConfigureAwait(false);
        var socket = new Socket(target.AddressFamily, SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
        try
        {
            await socket.ConnectAsync(target, timeout.Token).ConfigureAwait(false);
        }
        catch (OperationCanceledException) when (!_shutdown.IsCancellationRequested)
        {
            socket.Dispose();
            throw new TimeoutException($"Connecting to data-plane peer {peerEndpoint} timed out after {_options.ConnectTimeout}.");
        }
        catch
        {
            socket.Dispose();
            throw;
        }
        var connection = new OutgoingConnection(peerEndpoint, socket, OnOutgoingClosed);
        if (Volatile.Read(ref _disposed) != 0)
        {
            // Disposal ran while this dial was in flight and could not see it.
            connection.Dispose();
            throw new ObjectDisposedException(nameof(DataPlaneNode));
        }
        Log(DataPlaneLogLevel.Debug, $"Data plane {Endpoint}: connected to {peerEndpoint}.", null);
        return connection;
    }

    private void OnOutgoingClosed(OutgoingConnection connection, string reason, Exception? exception)
    {
        foreach (var (peer, lazy) in _outgoing)
        {
            if (lazy.IsValueCreated && lazy.Value.IsCompletedSuccessfully && ReferenceEquals(lazy.Value.Result, connection))
                _outgoing.TryRemove(KeyValuePair.Create(peer, lazy));
        }
        if (Volatile.Read(ref _disposed) == 0)
            Log(DataPlaneLogLevel.Info, $"Data plane {Endpoint}: connection to {connection.Peer} closed ({reason}).", exception);
    }

    private async Task AcceptLoopAsync()
    {
        var token = _shutdown.Token;
        while (!token.IsCancellationRequested)
        {
            Socket socket;
            try
            {
                socket = await _listener.AcceptAsync(token).ConfigureAwait(false);
            }
            catch (Exception) when (token.IsCancellationRequested)
            {
                return;
            }
            catch (Exception ex)
            {
                // Typically out of file descriptors: keep listening, a slot may free up.
                Log(DataPlaneLogLevel.Error, $"Data plane {Endpoint}: accept failed: {ex.Message}", ex);
                try { await Task.Delay(100, token).ConfigureAwait(false); } catch (OperationCanceledException) { return; }
                continue;
            }
            socket.NoDelay = true;
            var started = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            // Registered before the loop runs so that a fast close cannot remove it before it is added.
            _incoming[socket] = Task.Run(async () =>
            {
                await started.Task.ConfigureAwait(false);
                await ReadLoopAsync(socket).ConfigureAwait(false);
            });
            started.SetResult();
        }
    }

    private async Task ReadLoopAsync(Socket socket)
    {
        var token = _shutdown.Token;
        var budget = new ByteBudget(_options.MaxBufferedBytesPerConnection);
        var remote = socket.RemoteEndPoint?.ToString() ?? "?";
        var header = new byte[FrameHeader.Size];
        try
        {
            while (true)
            {
                var (got, prefixError) = await ReceiveHeaderAsync(socket, header, token).ConfigureAwait(false);
                if (got == 0) return; // closed between frames: a clean goodbye
                if (prefixError is null && got < header.Length)
                {
                    Log(DataPlaneLogLevel.Warning, $"Data plane {Endpoint}: connection from {remote} closed inside a frame header.", null);
                    return;
                }
                FrameHeader h = default;
                string? error = prefixError;
                if (error is not null || !FrameHeader.TryParse(header, _options.MaxFrameBytes, out h, out error) || !FitsInArray(h, out error))
                {
                    Interlocked.Increment(ref _protocolErrors);
                    Log(DataPlaneLogLevel.Warning, $"Data plane {Endpoint}: closing connection from {remote}: {error}.", null);
                    return;
                }

                var decoded = (int)h.DecodedLength;
                // Waiting here, before reading the payload, is the backpressure: the socket is left unread.
                await budget.AcquireAsync(decoded, token).ConfigureAwait(false);
                var buffer = BufferPool.Rent(Math.Max(decoded, 1));
                var delivered = false;
                try
                {
                    // Compressed bytes land in the upper half of the consumer's buffer and widen in place.
                    var wire = buffer.AsMemory(decoded - (int)h.PayloadLength, (int)h.PayloadLength);
                    var read = await ReceiveFullyAsync(socket, wire, token).ConfigureAwait(false);
                    if (read < wire.Length)
                    {
                        Log(DataPlaneLogLevel.Warning,
                            $"Data plane {Endpoint}: connection from {remote} closed after {read} of {wire.Length} payload bytes of tag {h.Tag}.", null);
                        return;
                    }
                    long bytes = FrameHeader.Size + h.PayloadLength;
                    Interlocked.Add(ref _bytesReceived, bytes);
                    DataPlaneTraffic.Received(bytes);
                    if (h.Compression == Compression.BFloat16) BFloat16.DecompressInPlace(buffer.AsSpan(0, decoded), (int)h.ElementCount);
                    var frame = new Frame(h.Tag, h.Source, h.ElementType, h.Shape, buffer, decoded, h.Compression != Compression.None, _frames);
                    delivered = true;
                    _mailboxes.Deliver(frame, budget, decoded);
                }
                finally
                {
                    if (!delivered)
                    {
                        BufferPool.Return(buffer);
                        budget.Release(decoded);
                    }
                }
            }
        }
        catch (Exception) when (token.IsCancellationRequested)
        {
            // Node shutting down.
        }
        catch (Exception ex) when (ex is SocketException or ObjectDisposedException or IOException)
        {
            Log(DataPlaneLogLevel.Info, $"Data plane {Endpoint}: connection from {remote} lost: {ex.Message}", null);
        }
        catch (Exception ex)
        {
            // A bug here must cost one connection, not the node.
            Log(DataPlaneLogLevel.Error, $"Data plane {Endpoint}: reader for {remote} failed.", ex);
        }
        finally
        {
            try { socket.Shutdown(SocketShutdown.Both); } catch (SocketException) { } catch (ObjectDisposedException) { }
            socket.Dispose();
            _incoming.TryRemove(socket, out _);
        }
    }

    private static bool FitsInArray(in FrameHeader header, out string? error)
    {
        if (header.DecodedLength > Array.MaxLength)
        {
            error = $"decoded payload of {header.DecodedLength} bytes does not fit one buffer";
            return false;
        }
        error = null;
        return true;
    }

    // Fills the header buffer unless the peer closes first, checking magic and version as soon as they are in:
    // another version's header has another size, so waiting for a whole one could hang on a short frame of a
    // peer that then sends nothing more, instead of refusing it. Returns how much arrived and the refusal, if any.
    private static async ValueTask<(int Got, string? PrefixError)> ReceiveHeaderAsync(Socket socket, byte[] header, CancellationToken token)
    {
        var total = 0;
        while (total < header.Length)
        {
            var n = await socket.ReceiveAsync(header.AsMemory(total), SocketFlags.None, token).ConfigureAwait(false);
            if (n == 0) break;
            var before = total;
            total += n;
            if (before < FrameHeader.PrefixSize && total >= FrameHeader.PrefixSize && !FrameHeader.TryParsePrefix(header, out var error))
                return (total, error);
        }
        return (total, null);
    }

    // Fills the buffer unless the peer closes first; returns how much arrived.
    private static async ValueTask<int> ReceiveFullyAsync(Socket socket, Memory<byte> buffer, CancellationToken token)
    {
        var total = 0;
        while (total < buffer.Length)
        {
            var n = await socket.ReceiveAsync(buffer[total..], SocketFlags.None, token).ConfigureAwait(false);
            if (n == 0) break;
            total += n;
        }
        return total;
    }

    private void Log(DataPlaneLogLevel level, string message, Exception? exception)
    {
        try
        {
            _options.Log?.Invoke(level, message, exception);
        }
        catch
        {
            // A failing logger must not take a connection down with it.
        }
    }

    public async ValueTask DisposeAsync()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0) return;
        _shutdown.Cancel();
        _listener.Dispose();
        foreach (var socket in _incoming.Keys)
        {
            try { socket.Shutdown(SocketShutdown.Both); } catch (SocketException) { } catch (ObjectDisposedException) { }
        }
        foreach (var lazy in _outgoing.Values)
        {
            if (lazy.IsValueCreated && lazy.Value.IsCompletedSuccessfully) lazy.Value.Result.Dispose();
        }
        _outgoing.Clear();
        try { await _acceptLoop.ConfigureAwait(false); } catch { /* already logged */ }
        try { await Task.WhenAll(_incoming.Values).ConfigureAwait(false); } catch { /* already logged */ }
        _mailboxes.Close();
        _shutdown.Dispose();
    }

    public void Dispose() => DisposeAsync().AsTask().GetAwaiter().GetResult();

    public override string ToString() => $"DataPlaneNode({Endpoint}, id {NodeId})";
}
