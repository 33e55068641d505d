using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;

namespace ElasticMoE.Cli;

/// <summary>
/// A small rack of test hosts made of Linux network namespaces: a switch (a bridge in a namespace of its own) and
/// <c>N</c> hosts, each a namespace with its loopback and one veth cable to the switch, at 10.231.0.(10 + i)/24.
/// Processes run inside a host through <c>ip netns exec</c> (<see cref="Wrap"/>), which execs the program, so a pid
/// is the program's own and a SIGKILL hits it. Faults are made the way real networks make them: a cable pulled
/// (<see cref="Cut"/>: the switch port goes down, nothing answers, no reset), one direction dropped, a share of
/// packets dropped (<c>iptables -m statistic</c>) and egress capped (<c>tc tbf</c>). There is no <c>netem</c> in
/// this kernel, so no added latency.
/// </summary>
/// <remarks>
/// Every namespace is named <c>emoe{pid}-…</c> after the process that made it; <see cref="Dispose"/> removes them all
/// (with the processes inside, which die with their network), and a new rack first removes the racks of processes
/// that no longer exist, so a crashed test leaves nothing behind for long. The addresses exist only inside the
/// rack's own namespaces: two racks side by side (two test runs) never see each other, and nothing outside is touched.
/// </remarks>
internal sealed class HostRack : IDisposable
{
    private const string Prefix = "emoe";
    private readonly string _name;
    private readonly List<string> _namespaces = [];
    private bool _disposed;

    public int Count { get; }

    /// <summary>Why a rack cannot be made here (not root, no <c>ip</c>, no namespaces), or null when it can.</summary>
    public static string? Unavailable => Probe.Value;

    private static readonly Lazy<string?> Probe = new(() =>
    {
        if (!OperatingSystem.IsLinux()) return "test hosts need Linux network namespaces";
        if (geteuid() != 0) return "test hosts need root (ip netns, veth, iptables, tc): run the tests as root";
        foreach (var tool in new[] { "ip", "iptables", "tc" })
            if (Which(tool) is null) return $"test hosts need '{tool}' on PATH (Debian: iproute2, iptables)";
        var probe = $"{Prefix}{Environment.ProcessId}-probe";
        var (code, output) = Run("ip", ["netns", "add", probe], check: false);
        if (code != 0) return $"network namespaces cannot be made here: ip netns add said: {output.Trim()}";
        Run("ip", ["netns", "del", probe], check: false);
        return null;
    });

    /// <summary>Builds the switch and <paramref name="hosts"/> hosts (at most 200).</summary>
    public HostRack(int hosts)
    {
        if (Unavailable is { } why) throw new InvalidOperationException(why);
        if (hosts is < 1 or > 200) throw new ArgumentOutOfRangeException(nameof(hosts), hosts, "1 to 200 hosts");
        RemoveAbandoned();
        Count = hosts;
        _name = $"{Prefix}{Environment.ProcessId}-{Interlocked.Increment(ref _racks)}";
        try
        {
            var sw = Switch;
            Add(sw);
            Ip(sw, "link", "add", "br0", "type", "bridge");
            Ip(sw, "link", "set", "br0", "up");
            Ip(sw, "link", "set", "lo", "up");
            for (int i = 0; i < hosts; i++)
            {
                var h = Host(i);
                Add(h);
                // The cable: "eth0" in the host, "p{i}" (the switch port) in the switch namespace.
                Run("ip", ["-n", h, "link", "add", "eth0", "type", "veth", "peer", "name", Port(i), "netns", sw]);
                Ip(h, "addr", "add", Address(i) + "/24", "dev", "eth0");
                Ip(h, "link", "set", "eth0", "up");
                Ip(h, "link", "set", "lo", "up");
                Ip(sw, "link", "set", Port(i), "master", "br0");
                Ip(sw, "link", "set", Port(i), "up");
            }
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    private static int _racks;

    /// <summary>Host <paramref name="i"/>'s address on the rack's network.</summary>
    public static string Address(int i) => $"10.231.0.{10 + i}";

    /// <summary>The namespace of host <paramref name="i"/>.</summary>
    public string Host(int i) => $"{_name}-h{i}";

    private string Switch => $"{_name}-sw";
    private static string Port(int i) => $"p{i}";

    /// <summary>A command line that runs <paramref name="command"/> inside host <paramref name="i"/>; it becomes the program (same pid).</summary>
    public IReadOnlyList<string> Wrap(int i, IEnumerable<string> command) => ["ip", "netns", "exec", Host(i), .. command];

    /// <summary>Pulls host <paramref name="i"/>'s cable at the switch: its packets go nowhere and nothing comes back, no reset.</summary>
    public void Cut(int i) => Ip(Switch, "link", "set", Port(i), "down");

    /// <summary>Plugs host <paramref name="i"/>'s cable back in.</summary>
    public void Heal(int i) => Ip(Switch, "link", "set", Port(i), "up");

    /// <summary>Host <paramref name="i"/> can still receive but nothing it sends leaves (its loopback is untouched).</summary>
    public void DropOutgoing(int i) => Iptables(i, "-A", "OUTPUT", "-o", "eth0", "-j", "DROP");

    /// <summary>Host <paramref name="i"/> can still send but nothing reaches it.</summary>
    public void DropIncoming(int i) => Iptables(i, "-A", "INPUT", "-i", "eth0", "-j", "DROP");

    /// <summary>Drops a random <paramref name="fraction"/> of host <paramref name="i"/>'s packets, in and out.</summary>
    public void Lose(int i, double fraction)
    {
        var p = fraction.ToString("0.#####", CultureInfo.InvariantCulture);
        Iptables(i, "-A", "INPUT", "-i", "eth0", "-m", "statistic", "--mode", "random", "--probability", p, "-j", "DROP");
        Iptables(i, "-A", "OUTPUT", "-o", "eth0", "-m", "statistic", "--mode", "random", "--probability", p, "-j", "DROP");
    }

    /// <summary>Removes every drop rule of host <paramref name="i"/> (one-way drops and losses).</summary>
    public void ClearDrops(int i)
    {
        Iptables(i, "-F", "INPUT");
        Iptables(i, "-F", "OUTPUT");
    }

    /// <summary>Caps host <paramref name="i"/>'s egress at <paramref name="mbit"/> Mbit/s (a token bucket; 0 = no cap).</summary>
    public void Cap(int i, double mbit)
    {
        Run("tc", ["-n", Host(i), "qdisc", "del", "dev", "eth0", "root"], check: false);
        if (mbit <= 0) return;
        var rate = (mbit * 1000).ToString("0", CultureInfo.InvariantCulture);
        // burst: at least rate / HZ (250) bytes, else tbf cannot reach its rate; 50 ms of queue as a switch buffers.
        var burst = Math.Max(16 * 1024, (int)(mbit * 1e6 / 8 / 250)).ToString(CultureInfo.InvariantCulture);
        Run("tc", ["-n", Host(i), "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate + "kbit", "burst", burst, "latency", "50ms"]);
    }

    /// <summary>Bytes host <paramref name="i"/> has sent on its cable so far (the kernel's counter).</summary>
    public long BytesSent(int i)
    {
        var (_, output) = Run("ip", ["netns", "exec", Host(i), "cat", "/sys/class/net/eth0/statistics/tx_bytes"]);
        return long.Parse(output.Trim(), CultureInfo.InvariantCulture);
    }

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        foreach (var ns in Enumerable.Reverse(_namespaces)) Delete(ns);
        _namespaces.Clear();
    }

    private void Add(string ns)
    {
        Run("ip", ["netns", "add", ns]);
        _namespaces.Add(ns);
    }

    // A namespace's processes keep it alive after `ip netns del` (only its name goes); they are ours, so kill them.
    private static void Delete(string ns)
    {
        var (_, pids) = Run("ip", ["netns", "pids", ns], check: false);
        foreach (var line in pids.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
            if (int.TryParse(line, out var pid)) _ = kill(pid, 9);
        Run("ip", ["netns", "del", ns], check: false);
    }

    /// <summary>Removes the namespaces of racks whose making process is gone (a test run that crashed).</summary>
    private static void RemoveAbandoned()
    {
        var (_, list) = Run("ip", ["netns", "list"], check: false);
        foreach (var line in list.Split('\n', StringSplitOptions.RemoveEmptyEntries))
        {
            var ns = line.Split(' ')[0];
            if (!ns.StartsWith(Prefix, StringComparison.Ordinal)) continue;
            var digits = new string(ns.Skip(Prefix.Length).TakeWhile(char.IsDigit).ToArray());
            if (!int.TryParse(digits, out var owner) || owner == Environment.ProcessId) continue;
            if (!Directory.Exists($"/proc/{owner}")) Delete(ns);
        }
    }

    private void Iptables(int i, params string[] args) => Run("ip", ["netns", "exec", Host(i), "iptables", "-w", .. args]);

    private static void Ip(string ns, params string[] args) => Run("ip", ["-n", ns, .. args]);

    private static (int Code, string Output) Run(string program, IEnumerable<string> args, bool check = true)
    {
        var psi = new ProcessStartInfo(program) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in args) psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        var stderr = p.StandardError.ReadToEndAsync();
        var stdout = p.StandardOutput.ReadToEnd();
        p.WaitForExit();
        var output = stdout + stderr.Result;
        if (check && p.ExitCode != 0)
            throw new InvalidOperationException($"{program} {string.Join(' ', psi.ArgumentList)} failed ({p.ExitCode}): {output.Trim()}");
        return (p.ExitCode, output);
    }

    private static string? Which(string tool) =>
        (Environment.GetEnvironmentVariable("PATH") ?? "/usr/sbin:/usr/bin:/sbin:/bin").Split(':')
            .Concat(["/usr/sbin", "/sbin"]).Select(d => Path.Combine(d, tool)).FirstOrDefault(File.Exists);

    [DllImport("libc")]
    private static extern uint geteuid();

    [DllImport("libc", SetLastError = true)]
    private static extern int kill(int pid, int sig);
}
