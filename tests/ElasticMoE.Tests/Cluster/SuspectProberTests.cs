using System.Net;
using System.Net.Sockets;
using Akka.Actor;
using ElasticMoE.Cli;
using ElasticMoE.Runtime.Actors;
using ElasticMoE.Runtime.Hosting;
using Xunit;

namespace ElasticMoE.Tests.Cluster;

/// <summary>
/// The <see cref="SuspectProber"/> under a test parent, with real sockets: a suspect whose port refuses is confirmed
/// lost, one whose host answers is not (however long it stays suspected), and a step that runs overdue gets its nodes
/// probed. A silent host (no answer at all) needs test hosts: <see cref="A_cut_off_host_is_silent_to_a_probe"/>.
/// </summary>
public sealed class SuspectProberTests : Akka.TestKit.Xunit2.TestKit
{
    private static readonly TimeSpan Wait = TimeSpan.FromSeconds(10);

    private IActorRef Prober(double overdueFactor = 0) =>
        ChildActorOf(Props.Create(() => new SuspectProber(TimeSpan.FromSeconds(0.5), TimeSpan.FromSeconds(0.1), overdueFactor)));

    private static Address At(int port) => new("akka.tcp", "elasticmoe", "127.0.0.1", port);

    // A port nothing listens on: taken from the OS and closed again.
    private static int ClosedPort()
    {
        var l = new TcpListener(IPAddress.Loopback, 0);
        l.Start();
        int port = ((IPEndPoint)l.LocalEndpoint).Port;
        l.Stop();
        return port;
    }

    [Fact]
    public void A_suspect_whose_port_refuses_is_confirmed_lost()
    {
        var prober = Prober();
        var address = At(ClosedPort());
        prober.Tell(new SuspectProber.Suspect(address, 42));
        var c = ExpectMsg<SuspectProber.Confirmed>(Wait);
        Assert.Equal((address, 42L), (c.Address, c.Uid));
        Assert.Contains("refused", c.What);
    }

    [Fact]
    public void A_suspect_whose_host_answers_is_never_confirmed_and_is_dropped_when_reachable_again()
    {
        var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        try
        {
            var prober = Prober();
            var address = At(((IPEndPoint)listener.LocalEndpoint).Port);
            prober.Tell(new SuspectProber.Suspect(address, 1));
            // Probed every 0.1 s: a dozen answers, none a loss.
            ExpectNoMsg(TimeSpan.FromSeconds(1.2));
            prober.Tell(new SuspectProber.Cleared(address));
            listener.Stop();
            // Cleared: nothing probes it any more, so the port closing now is not a loss either.
            ExpectNoMsg(TimeSpan.FromSeconds(0.5));
        }
        finally
        {
            listener.Stop();
        }
    }

    [Fact]
    public void An_overdue_step_gets_its_nodes_probed_and_a_refusing_one_confirmed()
    {
        var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        try
        {
            var prober = Prober(overdueFactor: 2);
            var alive = At(((IPEndPoint)listener.LocalEndpoint).Port);
            var gone = At(ClosedPort());
            // Three committed steps of 0.1 s: overdue after max(0.25 s, 2 x 0.1 s).
            for (int i = 0; i < 3; i++) prober.Tell(new SuspectProber.StepEnded(0.1));
            prober.Tell(new SuspectProber.StepStarted([(alive, 1L), (gone, 2L)]));
            var c = ExpectMsg<SuspectProber.Confirmed>(Wait);
            Assert.Equal(gone, c.Address);
            Assert.Contains("overdue", c.What);
            ExpectNoMsg(TimeSpan.FromSeconds(1));   // the live one answers every probe
            prober.Tell(new SuspectProber.StepEnded(0.1));
        }
        finally
        {
            listener.Stop();
        }
    }

    [Fact]
    public void A_step_that_ends_in_time_probes_nobody_and_the_first_steps_are_never_overdue()
    {
        var prober = Prober(overdueFactor: 2);
        var gone = At(ClosedPort());
        // No step timing known yet (start-up): a long first step is not a suspicion.
        prober.Tell(new SuspectProber.StepStarted([(gone, 2L)]));
        ExpectNoMsg(TimeSpan.FromSeconds(0.8));
        prober.Tell(new SuspectProber.StepEnded(0.5));
        for (int i = 0; i < 3; i++) prober.Tell(new SuspectProber.StepEnded(0.5));
        // Overdue after 1 s: the step ends first.
        prober.Tell(new SuspectProber.StepStarted([(gone, 2L)]));
        prober.Tell(new SuspectProber.StepEnded(0.2));
        ExpectNoMsg(TimeSpan.FromSeconds(1.5));
    }

    [HostFact]
    public async Task A_cut_off_host_is_silent_to_a_probe()
    {
        using var rack = new HostRack(2);
        // Probe host 1's port 9 from host 0; the probing process runs in the rack too (a probe is a plain connect).
        var before = await ProbeFrom(rack, 0, 1);
        rack.Cut(1);
        var after = await ProbeFrom(rack, 0, 1);
        Assert.Equal("Refused", before);   // its kernel answers: nothing listens there, so a reset
        Assert.Equal("Silent", after);     // the cable is out: no answer at all
    }

    // One connect from inside host `from` to host `to`, as ConnectionProbe classifies it, by a shell's bash /dev/tcp.
    private static async Task<string> ProbeFrom(HostRack rack, int from, int to)
    {
        var psi = new System.Diagnostics.ProcessStartInfo("ip") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in rack.Wrap(from, ["timeout", "0.5", "bash", "-c", $"exec 3<>/dev/tcp/{HostRack.Address(to)}/9"]).Skip(1)) psi.ArgumentList.Add(a);
        using var p = System.Diagnostics.Process.Start(psi)!;
        var err = await p.StandardError.ReadToEndAsync();
        await p.WaitForExitAsync();
        return p.ExitCode switch
        {
            0 => "Accepted",
            124 => "Silent",
            _ when err.Contains("refused", StringComparison.OrdinalIgnoreCase) => "Refused",
            _ => $"exit {p.ExitCode}: {err}",
        };
    }
}
