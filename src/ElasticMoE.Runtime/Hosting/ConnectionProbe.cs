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

    /// <summary>What a peer's host did when connected to: accepted, refused (nothing listens), or said nothing in time.</summary>
    public enum Answer { Accepted, Refused, Silent }

    /// <summary>
    /// <paramref name="attempts"/> TCP connects to <paramref name="address"/> side by side: Accepted if any is accepted,
    /// Refused if one is refused, else Silent (none answered within <paramref name="timeout"/>).
    /// </summary>
    /// <remarks>
    /// Why several: a dropped SYN is retransmitted only after a second, so one connect under 1 % packet loss would
    /// call a live host silent once in a hundred probes; three lose all their SYNs once in a million.
    /// Why a connect proves life: the peer's kernel answers it even when the process is starved of CPU, so a busy
    /// node is never taken for a lost one; a host cut off answers nothing.
    /// </remarks>
    public static async Task<Answer> ProbeAsync(Address address, TimeSpan timeout, int attempts = 3)
    {
        if (address.Host is null || address.Port is null) return Answer.Silent;
        using var cts = new CancellationTokenSource(timeout);
        async Task<Answer> One()
        {
            using var client = new System.Net.Sockets.TcpClient();
            try
            {
                await client.ConnectAsync(address.Host, address.Port.Value, cts.Token).ConfigureAwait(false);
                return Answer.Accepted;
            }
            catch (System.Net.Sockets.SocketException e) when (e.SocketErrorCode == System.Net.Sockets.SocketError.ConnectionRefused)
            {
                return Answer.Refused;
            }
            catch (Exception)
            {
                return Answer.Silent;
            }
        }
        var pending = Enumerable.Range(0, Math.Max(1, attempts)).Select(_ => One()).ToList();
        var seen = Answer.Silent;
        while (pending.Count > 0)
        {
            var done = await Task.WhenAny(pending).ConfigureAwait(false);
            pending.Remove(done);
            var a = await done.ConfigureAwait(false);
            if (a == Answer.Accepted) { cts.Cancel(); return a; }
            if (a == Answer.Refused) seen = Answer.Refused;
        }
        return seen;
    }
}
