using Akka.Event;

namespace ElasticMoE.Runtime.DataPlane;

public enum DataPlaneLogLevel { Debug, Info, Warning, Error }

/// <summary>Receives the data plane's log lines; must not throw and must not block.</summary>
public delegate void DataPlaneLog(DataPlaneLogLevel level, string message, Exception? exception);

public sealed record DataPlaneOptions
{
    public const long DefaultMaxFrameBytes = 256L << 20;

    /// <summary>Address to bind. Loopback by default, so nothing listens on a public interface unless asked to.</summary>
    public string Host { get; init; } = "127.0.0.1";

    /// <summary>Port to bind; 0 picks a free one (see <see cref="DataPlaneNode.Endpoint"/>).</summary>
    public int Port { get; init; }

    /// <summary>
    /// Host that peers should dial, when it differs from <see cref="Host"/> (binding 0.0.0.0 for instance).
    /// Null = <see cref="Host"/>.
    /// </summary>
    public string? AdvertisedHost { get; init; }

    /// <summary>Written into every frame this node sends, so a receiver can tell where a frame came from.</summary>
    public int NodeId { get; init; }

    /// <summary>
    /// Largest payload accepted or sent, in wire bytes. A header announcing more closes its connection:
    /// a corrupt length must not make the receiver rent gigabytes.
    /// </summary>
    public long MaxFrameBytes { get; init; } = DefaultMaxFrameBytes;

    /// <summary>
    /// Per incoming connection, how many bytes of received-but-unclaimed frames may wait in mailboxes before
    /// the node stops reading that socket. Past it, TCP flow control pushes back on the sender instead of
    /// this process growing without bound. One frame is always admitted when nothing is buffered, so a
    /// frame larger than this still gets through. Total buffering is bounded by peers x this value.
    /// </summary>
    public long MaxBufferedBytesPerConnection { get; init; } = DefaultMaxFrameBytes;

    public TimeSpan ConnectTimeout { get; init; } = TimeSpan.FromSeconds(10);

    /// <summary>Null = silent.</summary>
    public DataPlaneLog? Log { get; init; }

    /// <summary>Routes the data plane's log lines into an Akka log (the node's actor system's, typically).</summary>
    public DataPlaneOptions WithAkkaLog(ILoggingAdapter log) => WithAkkaLog(() => log);

    /// <summary>Routes the log lines into whichever Akka log <paramref name="current"/> returns then (null: dropped).</summary>
    public DataPlaneOptions WithAkkaLog(Func<ILoggingAdapter?> current) => this with
    {
        Log = (level, message, exception) =>
        {
            if (current() is not { } log) return;
            switch (level)
            {
                case DataPlaneLogLevel.Debug: log.Debug(message); break;
                case DataPlaneLogLevel.Info: log.Info(message); break;
                case DataPlaneLogLevel.Warning:
                    if (exception is null) log.Warning(message); else log.Warning(exception, message);
                    break;
                default:
                    if (exception is null) log.Error(message); else log.Error(exception, message);
                    break;
            }
        },
    };

    internal void Validate()
    {
        if (MaxFrameBytes is < 1 or > 1L << 30)
            throw new ArgumentOutOfRangeException(nameof(MaxFrameBytes), MaxFrameBytes, "Must be between 1 byte and 1 GiB.");
        if (MaxBufferedBytesPerConnection < 1)
            throw new ArgumentOutOfRangeException(nameof(MaxBufferedBytesPerConnection), MaxBufferedBytesPerConnection, "Must be positive.");
        if (Port is < 0 or > 65535) throw new ArgumentOutOfRangeException(nameof(Port), Port, "Not a TCP port.");
        if (ConnectTimeout <= TimeSpan.Zero) throw new ArgumentOutOfRangeException(nameof(ConnectTimeout), ConnectTimeout, "Must be positive.");
    }
}
