using System.Globalization;
using System.Net;
using System.Net.Sockets;

namespace ElasticMoE.Runtime.DataPlane;

/// <summary>Parses the "host:port" strings peers are named by ("[::1]:port" for IPv6 literals).</summary>
public static class PeerEndpoint
{
    public static (string Host, int Port) Parse(string endpoint)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(endpoint);
        var colon = endpoint.LastIndexOf(':');
        if (colon <= 0 || colon == endpoint.Length - 1)
            throw new FormatException($"Data-plane endpoint '{endpoint}' is not of the form host:port.");
        var host = endpoint[..colon];
        if (host.StartsWith('[') && host.EndsWith(']')) host = host[1..^1];
        if (!int.TryParse(endpoint.AsSpan(colon + 1), NumberStyles.None, CultureInfo.InvariantCulture, out var port) || port is < 1 or > 65535)
            throw new FormatException($"Data-plane endpoint '{endpoint}' has no valid port.");
        return (host, port);
    }

    public static string Format(string host, int port) =>
        host.Contains(':') ? $"[{host}]:{port}" : $"{host}:{port}";

    internal static async Task<IPEndPoint> ResolveAsync(string endpoint, CancellationToken cancellationToken)
    {
        var (host, port) = Parse(endpoint);
        if (IPAddress.TryParse(host, out var address)) return new IPEndPoint(address, port);
        var addresses = await Dns.GetHostAddressesAsync(host, cancellationToken).ConfigureAwait(false);
        // Prefer IPv4: "localhost" resolving to ::1 first would miss a listener bound to 127.0.0.1.
        var chosen = addresses.FirstOrDefault(a => a.AddressFamily == AddressFamily.InterNetwork) ?? addresses.FirstOrDefault()
            ?? throw new SocketException((int)SocketError.HostNotFound);
        return new IPEndPoint(chosen, port);
    }
}
