using System.Net;
using System.Net.Sockets;
using ElasticMoE.Configuration;
using Prometheus;

namespace ElasticMoE.Runtime.Observability;

/// <summary>
/// This process's Prometheus endpoint, <c>http://HOST:PORT/metrics</c>, serving <see cref="RunMetrics"/>;
/// started by the <c>train</c> and <c>node</c> commands when <c>metrics.prometheus.port</c> is set, and
/// stopped (its port released) when disposed.
/// </summary>
/// <remarks>
/// prometheus-net's <see cref="MetricServer"/> is an <see cref="HttpListener"/>: no web framework in a
/// training process for one read-only page. HttpListener matches each request's Host header against its
/// prefix, so the endpoint answers to the host as configured (scrape <c>127.0.0.1</c>, not <c>localhost</c>,
/// when that is what was set), and "every interface" (<c>0.0.0.0</c> or <c>::</c>) becomes its wildcard.
/// </remarks>
public sealed class MetricsEndpoint : IDisposable
{
    private readonly MetricServer _server;

    private MetricsEndpoint(MetricServer server, Uri url)
    {
        _server = server;
        Url = url;
    }

    /// <summary>Where it is scraped.</summary>
    public Uri Url { get; }

    /// <returns>The running endpoint, or null when <paramref name="options"/> has port 0: then nothing listens.</returns>
    /// <exception cref="ConfigException">The address cannot be listened on (port taken, host not of this machine), naming the keys.</exception>
    public static MetricsEndpoint? Start(PrometheusOptions options)
    {
        if (options.Port == 0) return null;
        bool anywhere = options.Host is "0.0.0.0" or "::";
        var host = IPAddress.TryParse(options.Host, out var ip) && ip.AddressFamily == AddressFamily.InterNetworkV6 ? $"[{options.Host}]" : options.Host;
        var url = new Uri($"http://{(anywhere ? "127.0.0.1" : host)}:{options.Port}/metrics");
        var server = new MetricServer(anywhere ? "+" : host, options.Port, "metrics/", RunMetrics.Registry);
        try
        {
            server.Start();
        }
        catch (Exception ex) when (ex is HttpListenerException or SocketException or ArgumentException)
        {
            server.Dispose();
            throw new ConfigException(
                $"elasticmoe.metrics.prometheus: cannot serve metrics on {options.Host}:{options.Port} (metrics.prometheus.host, metrics.prometheus.port): {ex.Message}");
        }
        return new MetricsEndpoint(server, url);
    }

    public void Dispose() => _server.Dispose();
}
