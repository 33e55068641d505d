namespace ElasticMoE.Runtime.DataPlane;

/// <summary>
/// Bytes this process's data-plane nodes put on the wire and took off it, frame headers included, all nodes
/// together (the Prometheus endpoint is per process, and workers' nodes come and go with re-plans).
/// </summary>
/// <remarks>
/// Two <see cref="Interlocked"/> adds per frame and nothing allocated: a frame is at least a 96-byte
/// header and a syscall, so counting it costs next to nothing. Read when the metrics are scraped.
/// </remarks>
public static class DataPlaneTraffic
{
    private static long _sent, _received;

    public static long BytesSent => Interlocked.Read(ref _sent);

    public static long BytesReceived => Interlocked.Read(ref _received);

    internal static void Sent(long bytes) => Interlocked.Add(ref _sent, bytes);

    internal static void Received(long bytes) => Interlocked.Add(ref _received, bytes);
}
