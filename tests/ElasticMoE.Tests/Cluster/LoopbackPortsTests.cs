using System.Net;
using System.Net.Sockets;
using ElasticMoE.Runtime.Hosting;

namespace ElasticMoE.Tests.Cluster;

public class LoopbackPortsTests
{
    [Fact]
    public void Ports_handed_out_are_distinct_bindable_and_outside_the_ephemeral_range()
    {
        var range = File.ReadAllText("/proc/sys/net/ipv4/ip_local_port_range").Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries).Select(int.Parse).ToArray();
        var ports = Enumerable.Range(0, 50).Select(_ => LoopbackPorts.Next()).ToList();
        Assert.Equal(ports.Count, ports.Distinct().Count());
        Assert.All(ports, p => Assert.True(p < range[0] || p > range[1], $"{p} in the ephemeral range {range[0]}-{range[1]}"));
        foreach (var p in ports.Take(5))
        {
            var l = new TcpListener(IPAddress.Loopback, p);
            l.Start();
            l.Stop();
        }
    }

    [Fact]
    public void A_port_something_listens_on_is_skipped()
    {
        int port = LoopbackPorts.Next();
        // Hold the next few ports the way a child process would, then ask again: none of them comes back.
        var held = new List<TcpListener>();
        try
        {
            for (int p = port + 1; p <= port + 3; p++)
            {
                var l = new TcpListener(IPAddress.Loopback, p);
                try { l.Start(); held.Add(l); } catch (SocketException) { }
            }
            int next = LoopbackPorts.Next();
            Assert.DoesNotContain(next, held.Select(l => ((IPEndPoint)l.LocalEndpoint).Port));
        }
        finally
        {
            foreach (var l in held) l.Stop();
        }
    }
}
