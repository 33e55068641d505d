using Akka.Actor;

namespace ElasticMoE.Runtime.Hosting;

/// <summary>
/// Tells a dead process from a dropped connection: after a remoting connection closes, a fresh TCP connect
/// to the peer's remoting port that is refused means nothing listens there any more (for a killed process
/// on a reachable host that takes about a millisecond). Akka's failure detector needs ~4.5 s for the same
/// verdict on loopback, because it must tell a slow peer from a dead one; a refusal is unambiguous.
/// </summary>
public static class ConnectionProbe
{
    /// <summary>True when a connection to <paramref name="address"/> is refused; false when it connects, times out or fails otherwise (proves nothing).</summary>
    public static async Task<bool> RefusedAsync(Address address, TimeSpan timeout)
    {
        if (address.Host is null || address.Port is null) return false;
        using var client = new System.Net.Sockets.TcpClient();
        using var cts = new CancellationTokenSource(timeout);
        try
        {
            await client.ConnectAsync(address.Host, address.Port.Value, cts.Token).ConfigureAwait(false);
            return false;
        }
        catch (System.Net.Sockets.SocketException e) when (e.SocketErrorCode == System.Net.Sockets.SocketError.ConnectionRefused)
        {
            return true;
        }
        catch (Exception)
        {
            return false;
        }
    }
}
