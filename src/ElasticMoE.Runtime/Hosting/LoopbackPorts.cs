using System.Net;
using System.Net.Sockets;

namespace ElasticMoE.Runtime.Hosting;

/// <summary>
/// Loopback ports for processes this one starts and tells where to listen (the clusters of the tests and of
/// <c>elasticmoe bench</c>): free when handed out, and outside the kernel's ephemeral range.
/// </summary>
/// <remarks>
/// Why not the port of a listener on port 0: that port is in the ephemeral range, and between handing it out and the
/// child's bind any outgoing connection on the machine may be given it as its local port — a test run's nodes open
/// dozens. CI lost a resume test to exactly that (the coordinator: "Failed to bind to 127.0.0.1:37015 … Address
/// already in use"). Ports below the ephemeral range are only ever taken by a listener asking for them by number.
/// Each process starts at a random point of the range and hands out ports in turn, so two of its callers never get
/// the same one and two processes doing this rarely meet; a port some listener holds is skipped.
/// </remarks>
public static class LoopbackPorts
{
    private static readonly object Gate = new();
    private static int _next = -1;

    /// <summary>A loopback port nothing listens on now, outside the ephemeral range.</summary>
    public static int Next()
    {
        var (low, high) = Range();
        lock (Gate)
        {
            if (_next < 0) _next = low + Random.Shared.Next(high - low);
            for (int tried = 0; tried < high - low; tried++)
            {
                int port = _next;
                _next = _next + 1 >= high ? low : _next + 1;
                if (Bindable(port)) return port;
            }
        }
        throw new InvalidOperationException($"no free loopback port in {low}..{high - 1}");
    }

    // [low, high): below the ephemeral range when there is room (Linux's default is 32768–60999), else above it.
    private static (int Low, int High) Range()
    {
        int ephemeralLow = 32768, ephemeralHigh = 60999;
        try
        {
            var parts = File.ReadAllText("/proc/sys/net/ipv4/ip_local_port_range").Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries);
            if (parts.Length == 2 && int.TryParse(parts[0], out var lo) && int.TryParse(parts[1], out var hi)) (ephemeralLow, ephemeralHigh) = (lo, hi);
        }
        catch (IOException) { }
        catch (UnauthorizedAccessException) { }
        return ephemeralLow - 10000 >= 2000 ? (10000, ephemeralLow) : (ephemeralHigh + 1, 65536);
    }

    private static bool Bindable(int port)
    {
        try
        {
            var listener = new TcpListener(IPAddress.Loopback, port);
            listener.Start();
            listener.Stop();
            return true;
        }
        catch (SocketException)
        {
            return false;
        }
    }
}
