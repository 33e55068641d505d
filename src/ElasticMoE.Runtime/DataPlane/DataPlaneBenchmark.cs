using System.Buffers.Binary;
using System.Diagnostics;
using System.Net;
using System.Net.Sockets;

namespace ElasticMoE.Runtime.DataPlane;

/// <param name="SizeMb">Payload size in MiB (2^20 bytes); throughputs are in MiB/s too.</param>
public sealed record DataPlaneBenchmarkResult(int SizeMb, int Repeats, double DataPlaneMBps, double RawSocketMBps)
{
    /// <summary>Data plane over raw socket; the target is at least 0.5.</summary>
    public double Ratio => RawSocketMBps > 0 ? DataPlaneMBps / RawSocketMBps : 0;

    public override string ToString() =>
        $"{SizeMb,5} MB  data plane {DataPlaneMBps,9:F0} MB/s  raw socket {RawSocketMBps,9:F0} MB/s  ratio {Ratio:F2}";
}

/// <summary>
/// Loopback throughput of the data plane against a bare socket moving the same bytes, in the same process
/// and run, so the ratio says what the framing, pooling and mailboxes cost and not how fast this box is.
/// </summary>
public static class DataPlaneBenchmark
{
    public static async Task<IReadOnlyList<DataPlaneBenchmarkResult>> RunAsync(int[] sizesMb, int repeats, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(sizesMb);
        ArgumentOutOfRangeException.ThrowIfLessThan(repeats, 1);
        if (sizesMb.Any(s => s is < 1 or > 1024)) throw new ArgumentOutOfRangeException(nameof(sizesMb), "Sizes are 1..1024 MB.");
        var maxFrame = Math.Max(DataPlaneOptions.DefaultMaxFrameBytes, (long)sizesMb.Max() << 20);
        var options = new DataPlaneOptions { MaxFrameBytes = maxFrame, MaxBufferedBytesPerConnection = maxFrame };
        await using var receiver = DataPlaneNode.Start(options with { NodeId = 1 });
        await using var sender = DataPlaneNode.Start(options with { NodeId = 0 });
        using var raw = await RawSocketPair.OpenAsync(cancellationToken).ConfigureAwait(false);

        var results = new List<DataPlaneBenchmarkResult>();
        long tag = 0;
        foreach (var sizeMb in sizesMb)
        {
            var payload = new byte[sizeMb << 20];
            new Random(sizeMb).NextBytes(payload);
            var rawTarget = new byte[payload.Length];

            // Warm-up: first connection, JIT, pool buckets, TCP windows.
            await DataPlaneOnceAsync(sender, receiver, tag++, payload, cancellationToken).ConfigureAwait(false);
            await raw.TransferAsync(payload, rawTarget, cancellationToken).ConfigureAwait(false);

            TimeSpan dataPlane = TimeSpan.Zero, rawSocket = TimeSpan.Zero;
            for (var i = 0; i < repeats; i++)
            {
                // Alternate which goes first so neither always inherits the other's cache and scheduler state.
                if (i % 2 == 0)
                {
                    dataPlane += await DataPlaneOnceAsync(sender, receiver, tag++, payload, cancellationToken).ConfigureAwait(false);
                    rawSocket += await raw.TransferAsync(payload, rawTarget, cancellationToken).ConfigureAwait(false);
                }
                else
                {
                    rawSocket += await raw.TransferAsync(payload, rawTarget, cancellationToken).ConfigureAwait(false);
                    dataPlane += await DataPlaneOnceAsync(sender, receiver, tag++, payload, cancellationToken).ConfigureAwait(false);
                }
            }
            double totalMb = (double)sizeMb * repeats;
            results.Add(new DataPlaneBenchmarkResult(sizeMb, repeats, totalMb / dataPlane.TotalSeconds, totalMb / rawSocket.TotalSeconds));
        }
        return results;
    }

    private static async Task<TimeSpan> DataPlaneOnceAsync(DataPlaneNode sender, DataPlaneNode receiver, long tag, byte[] payload,
        CancellationToken cancellationToken)
    {
        var clock = Stopwatch.StartNew();
        var receive = receiver.ReceiveAsync(tag, cancellationToken);
        await sender.SendAsync(receiver.Endpoint, tag, payload, ElementType.UInt8, null, cancellationToken).ConfigureAwait(false);
        using var frame = await receive.ConfigureAwait(false);
        clock.Stop();
        if (frame.Length != payload.Length) throw new InvalidOperationException($"Benchmark frame came back with {frame.Length} bytes.");
        return clock.Elapsed;
    }

    /// <summary>The baseline: a connected loopback pair, an 8-byte length, then the bytes; same async socket API.</summary>
    private sealed class RawSocketPair : IDisposable
    {
        private readonly Socket _client;
        private readonly Socket _server;
        private readonly byte[] _prefix = new byte[8];
        private readonly byte[] _prefixIn = new byte[8];

        private RawSocketPair(Socket client, Socket server)
        {
            _client = client;
            _server = server;
        }

        public static async Task<RawSocketPair> OpenAsync(CancellationToken cancellationToken)
        {
            using var listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
            listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
            listener.Listen(1);
            var client = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
            var accept = listener.AcceptAsync(cancellationToken).AsTask();
            await client.ConnectAsync(listener.LocalEndPoint!, cancellationToken).ConfigureAwait(false);
            var server = await accept.ConfigureAwait(false);
            server.NoDelay = true;
            return new RawSocketPair(client, server);
        }

        public async Task<TimeSpan> TransferAsync(byte[] payload, byte[] target, CancellationToken cancellationToken)
        {
            var clock = Stopwatch.StartNew();
            var read = Task.Run(async () =>
            {
                await ReceiveExactlyAsync(_server, _prefixIn, cancellationToken).ConfigureAwait(false);
                var length = BinaryPrimitives.ReadInt64LittleEndian(_prefixIn);
                await ReceiveExactlyAsync(_server, target.AsMemory(0, (int)length), cancellationToken).ConfigureAwait(false);
            }, cancellationToken);
            BinaryPrimitives.WriteInt64LittleEndian(_prefix, payload.Length);
            await SendAllAsync(_client, _prefix, cancellationToken).ConfigureAwait(false);
            await SendAllAsync(_client, payload, cancellationToken).ConfigureAwait(false);
            await read.ConfigureAwait(false);
            clock.Stop();
            return clock.Elapsed;
        }

        private static async Task SendAllAsync(Socket socket, ReadOnlyMemory<byte> data, CancellationToken cancellationToken)
        {
            while (!data.IsEmpty) data = data[await socket.SendAsync(data, SocketFlags.None, cancellationToken).ConfigureAwait(false)..];
        }

        private static async Task ReceiveExactlyAsync(Socket socket, Memory<byte> buffer, CancellationToken cancellationToken)
        {
            while (!buffer.IsEmpty)
            {
                var n = await socket.ReceiveAsync(buffer, SocketFlags.None, cancellationToken).ConfigureAwait(false);
                if (n == 0) throw new IOException("Raw benchmark socket closed early.");
                buffer = buffer[n..];
            }
        }

        public void Dispose()
        {
            _client.Dispose();
            _server.Dispose();
        }
    }
}
