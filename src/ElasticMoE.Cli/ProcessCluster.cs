using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using ElasticMoE.Runtime.Hosting;

namespace ElasticMoE.Cli;

/// <summary>
/// A coordinator (<c>elasticmoe train --nodes 0</c>) and <c>elasticmoe node</c> processes of this very
/// executable on loopback, each logging to a file of its own, for the benchmarks that SIGKILL nodes and
/// start fresh ones. The coordinator's metrics file is read as it grows (<see cref="Metrics"/>).
/// </summary>
internal sealed class ProcessCluster : IDisposable
{
    /// <summary>One OS process of the cluster.</summary>
    public sealed class Child(string name, string log, Process process, int host = 0)
    {
        public string Name { get; } = name;
        /// <summary>The rack host it runs on (0 without a rack).</summary>
        public int Host { get; } = host;
        public string Log { get; } = log;
        public Process Process { get; } = process;
        /// <summary>Taking part in the current plan: a first node once the run has started, a later one once its node-joined line is out.</summary>
        public bool Planned { get; set; }
        public bool Killed { get; set; }
        private string? _address;

        /// <summary>The node's Akka address from its first log line ("node ADDRESS joining ..."), null until it is printed.</summary>
        public string? Address
        {
            get
            {
                if (_address is null && File.Exists(Log))
                {
                    using var s = new FileStream(Log, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
                    using var r = new StreamReader(s);
                    while (r.ReadLine() is { } line)
                        if (line.StartsWith("node akka.tcp://", StringComparison.Ordinal) && line.Contains(" joining ", StringComparison.Ordinal))
                            return _address = line.Split(' ')[1];
                }
                return _address;
            }
        }

        public bool Alive => !Process.HasExited;
    }

    private readonly List<string> _configArgs;
    private readonly HostRack? _rack;
    private readonly IReadOnlyList<string> _program;
    private int _nodeCount;

    public string Dir { get; }
    public int Port { get; }
    public MetricsTail Metrics { get; }
    public Child? Coordinator { get; private set; }
    /// <summary>Every node process started, in order, killed ones included.</summary>
    public List<Child> Nodes { get; } = [];

    /// <param name="dir">Where the logs and the metrics file go (created).</param>
    /// <param name="configArgs">Config options every process gets alike (--set, --threads, ...): nodes must match the coordinator.</param>
    /// <param name="rack">Test hosts to run on: the coordinator on host 0, nodes on the others (null = this machine's loopback).</param>
    /// <param name="program">How to start elasticmoe (default: this executable again; tests name the built dll).</param>
    public ProcessCluster(string dir, IEnumerable<string> configArgs, HostRack? rack = null, IReadOnlyList<string>? program = null)
    {
        _rack = rack;
        _program = program ?? SelfCommand();
        Dir = dir;
        Directory.CreateDirectory(dir);
        _configArgs = configArgs.ToList();
        Port = LoopbackPorts.Next();
        Metrics = new MetricsTail(Path.Combine(dir, "metrics.jsonl"));
    }

    /// <summary>Starts the coordinator and waits until it listens (so the nodes started next find it).</summary>
    public Child StartCoordinator(int expectNodes, int steps, IEnumerable<string>? extra = null)
    {
        var args = new List<string> { "train", "--nodes", "0", "--expect-nodes", Inv(expectNodes), "--port", Inv(Port), "--steps", Inv(steps), "--metrics", Metrics.Path };
        args.AddRange(_configArgs);
        if (extra is not null) args.AddRange(extra);
        Coordinator = Launch("coordinator", Path.Combine(Dir, "coordinator.log"), OnHost(0, args), 0);
        // The coordinator's first line comes after libtorch is loaded (and its one-time patch written, which
        // processes starting side by side on a fresh build would race for), its address line once it listens.
        var sw = Stopwatch.StartNew();
        while (!LogContains(Coordinator.Log, "coordinator at "))
        {
            if (!Coordinator.Alive) throw new InvalidOperationException($"the coordinator exited at start-up ({Coordinator.Process.ExitCode}); see {Coordinator.Log}");
            if (sw.Elapsed > TimeSpan.FromSeconds(60)) throw new TimeoutException($"the coordinator did not listen within 60 s; see {Coordinator.Log}");
            Thread.Sleep(20);
        }
        return Coordinator;
    }

    /// <summary>Starts a fresh <c>elasticmoe node</c> that joins the coordinator.</summary>
    /// <param name="host">The rack host to start it on (default: hosts 1, 2, ... in turn); ignored without a rack.</param>
    /// <param name="extra">Arguments for this node only, after the cluster's (e.g. --notice-seconds, its own metrics port).</param>
    public Child StartNode(int? host = null, IEnumerable<string>? extra = null)
    {
        var name = $"node{++_nodeCount}";
        int h = _rack is null ? 0 : host ?? 1 + (_nodeCount - 1) % Math.Max(1, _rack.Count - 1);
        var args = new List<string> { "node", "--seed-node", $"akka.tcp://elasticmoe@{CoordinatorHost}:{Inv(Port)}" };
        args.AddRange(_configArgs);
        if (extra is not null) args.AddRange(extra);
        var child = Launch(name, Path.Combine(Dir, name + ".log"), OnHost(h, args), h);
        Nodes.Add(child);
        return child;
    }

    /// <summary>Where the coordinator listens: loopback, or rack host 0's address.</summary>
    public string CoordinatorHost => _rack is null ? "127.0.0.1" : HostRack.Address(0);

    // On a rack: bound to the host's address (remoting, data plane) and run inside its namespace.
    private IEnumerable<string> OnHost(int host, List<string> args) =>
        _rack is null ? _program.Concat(args) : _rack.Wrap(host, _program.Concat(args).Concat(["--set", $"cluster.host={HostRack.Address(host)}"]));

    /// <summary>A run that cannot go on as a benchmark expects: the coordinator exited, hung, or ran out of time.</summary>
    public sealed class Stopped(string message) : Exception(message);

    /// <summary>
    /// Polls the metrics until <paramref name="done"/> holds, marking nodes planned as their node-joined lines come.
    /// </summary>
    /// <exception cref="Stopped">The coordinator exited first, no step was committed for <paramref name="hang"/>, or
    /// <paramref name="overall"/> passed <paramref name="timeout"/>.</exception>
    public void Wait(Func<bool> done, string what, TimeSpan hang, Stopwatch overall, TimeSpan timeout)
    {
        var coordinator = Coordinator ?? throw new InvalidOperationException("no coordinator started");
        var progress = Stopwatch.StartNew();
        long seen = Metrics.LastStep;
        while (true)
        {
            Metrics.Poll();
            foreach (var n in Nodes.Where(n => !n.Planned && !n.Killed && n.Address is { } a && Metrics.Events.Any(e => e.Kind == "node-joined" && e.Node == a)))
                n.Planned = true;
            if (done()) return;
            if (!coordinator.Alive)
            {
                coordinator.Process.WaitForExit();
                Metrics.Poll();
                if (done()) return;
                throw new Stopped($"the coordinator exited ({coordinator.Process.ExitCode}) after step {Metrics.LastStep} while waiting for {what}");
            }
            if (Metrics.LastStep != seen) { seen = Metrics.LastStep; progress.Restart(); }
            if (progress.Elapsed > hang)
                throw new Stopped($"HANG: no step committed for {hang.TotalSeconds:F0} s after step {Metrics.LastStep} while waiting for {what}");
            if (overall.Elapsed > timeout)
                throw new Stopped($"overall timeout ({timeout.TotalSeconds:F0} s) after step {Metrics.LastStep} while waiting for {what}");
            Thread.Sleep(5);
        }
    }

    /// <summary>
    /// Waits a random fraction of the recent median step time, reading the metrics meanwhile (their lines keep the times
    /// they were seen): what comes next lands at a random point inside the next step — any phase, the update and the
    /// transfers included.
    /// </summary>
    public void PauseIntoNextStep(Random rng)
    {
        var recent = Metrics.Steps.TakeLast(5).Select(s => s.Seconds).Order().ToList();
        var until = Stopwatch.StartNew();
        var delay = TimeSpan.FromSeconds(rng.NextDouble() * recent[recent.Count / 2]);
        while (until.Elapsed < delay) { Metrics.Poll(); Thread.Sleep(2); }
    }

    /// <summary>SIGKILLs <paramref name="child"/>; returns the wall-clock time (Unix seconds) just before the signal.</summary>
    public static double Kill(Child child)
    {
        double t = UnixNow();
        child.Killed = true;
        try { child.Process.Kill(); } catch (InvalidOperationException) { }   // Process.Kill is SIGKILL on Unix
        return t;
    }

    /// <summary>Sends SIGTERM (a node leaves gracefully, the coordinator stops after the step in flight).</summary>
    public static void Terminate(Child child)
    {
        if (child.Alive) _ = kill(child.Process.Id, 15);
    }

    [DllImport("libc", SetLastError = true)]
    private static extern int kill(int pid, int sig);

    /// <summary>Waits for every process to end by itself for <paramref name="grace"/>, then SIGKILLs what is left.</summary>
    public void StopAll(TimeSpan grace)
    {
        var all = Nodes.Append(Coordinator).OfType<Child>().ToList();
        var sw = Stopwatch.StartNew();
        foreach (var c in all)
        {
            var left = grace - sw.Elapsed;
            if (left > TimeSpan.Zero) c.Process.WaitForExit(left);
            if (c.Alive) Kill(c);
            c.Process.WaitForExit();
        }
    }

    public void Dispose()
    {
        foreach (var c in Nodes.Append(Coordinator).OfType<Child>())
        {
            if (c.Alive) Kill(c);
            c.Process.Dispose();
        }
    }

    /// <summary>This executable with <paramref name="args"/>, its output (stdout and stderr) in <paramref name="log"/>.</summary>
    public static Child Launch(string name, string log, IEnumerable<string> args) => Launch(name, log, SelfCommand().Concat(args), 0);

    /// <summary>The program and arguments of <paramref name="command"/>, its output in <paramref name="log"/>.</summary>
    private static Child Launch(string name, string log, IEnumerable<string> command, int host)
    {
        // `sh -c 'exec ...'`: the shell redirects the output to the file and becomes the process, so the
        // pid is elasticmoe's own (a SIGKILL hits it, not a wrapper) and nothing here has to pump its pipes.
        var psi = new ProcessStartInfo("/bin/sh") { UseShellExecute = false };
        psi.ArgumentList.Add("-c");
        psi.ArgumentList.Add("exec \"$@\" >\"$ELASTICMOE_BENCH_LOG\" 2>&1 </dev/null");
        psi.ArgumentList.Add("sh");
        foreach (var a in command) psi.ArgumentList.Add(a);
        psi.Environment["ELASTICMOE_BENCH_LOG"] = log;
        return new Child(name, log, Process.Start(psi)!, host);
    }

    /// <summary>How to start this executable again: the apphost, or <c>dotnet elasticmoe.dll</c>.</summary>
    public static IReadOnlyList<string> SelfCommand()
    {
        // Under `dotnet elasticmoe.dll` the process is the muxer and the dll must be named again; under the apphost
        // (`./elasticmoe`) argument 0 is the dll too, but the apphost runs it by itself and would take it for a command.
        var entry = Environment.GetCommandLineArgs()[0];
        var host = Environment.ProcessPath!;
        bool muxer = Path.GetFileNameWithoutExtension(host).Equals("dotnet", StringComparison.OrdinalIgnoreCase);
        return muxer && entry.EndsWith(".dll", StringComparison.OrdinalIgnoreCase) ? [host, entry] : [host];
    }

    public static double UnixNow() => (DateTime.UtcNow - DateTime.UnixEpoch).TotalSeconds;

    public static bool LogContains(string path, string text)
    {
        if (!File.Exists(path)) return false;
        using var s = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
        using var r = new StreamReader(s);
        return r.ReadToEnd().Contains(text, StringComparison.Ordinal);
    }

    private static string Inv(int v) => v.ToString(CultureInfo.InvariantCulture);
}

/// <summary>A metrics file read as the coordinator appends to it: step lines and membership event lines.</summary>
internal sealed class MetricsTail(string path)
{
    /// <param name="SeenUnix">When this reader first saw the line (wall clock, Unix seconds; as fine as the polling).</param>
    public sealed record StepLine(long Step, double Loss, double GradNorm, double TokensPerSecond, double Seconds, double SeenUnix)
    {
        public double Tokens => TokensPerSecond * Seconds;
    }

    /// <summary>A node-lost / node-joined / node-left line with its recovery breakdown (NaN where the line has null).</summary>
    public sealed record EventLine(string Kind, string Node, long Step, double RecoverySeconds, double DetectedUnix, double ReplanSeconds, double InstallSeconds, double RedoSeconds);

    private long _offset;
    private readonly StringBuilder _partial = new();

    public string Path { get; } = path;
    public List<StepLine> Steps { get; } = [];
    public List<EventLine> Events { get; } = [];
    public long LastStep => Steps.Count > 0 ? Steps[^1].Step : 0;

    /// <summary>Reads what was appended since the last call.</summary>
    public void Poll()
    {
        if (!File.Exists(Path)) return;
        using var s = new FileStream(Path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete);
        if (s.Length < _offset) return;
        s.Seek(_offset, SeekOrigin.Begin);
        var buf = new byte[s.Length - _offset];
        int n = s.ReadAtLeast(buf, buf.Length, throwOnEndOfStream: false);
        _offset += n;
        _partial.Append(Encoding.UTF8.GetString(buf, 0, n));
        double now = ProcessCluster.UnixNow();
        var text = _partial.ToString();
        int end = text.LastIndexOf('\n');
        if (end < 0) return;
        _partial.Clear().Append(text[(end + 1)..]);
        foreach (var line in text[..end].Split('\n', StringSplitOptions.RemoveEmptyEntries)) Parse(line, now);
    }

    private void Parse(string line, double now)
    {
        using var doc = JsonDocument.Parse(line);
        var o = doc.RootElement;
        double Num(string key) => o.TryGetProperty(key, out var v) && v.ValueKind == JsonValueKind.Number ? v.GetDouble() : double.NaN;
        if (o.TryGetProperty("event", out var kind))
            // A rollback's line names no node (it is about units).
            Events.Add(new EventLine(kind.GetString()!, o.TryGetProperty("node", out var node) ? node.GetString() ?? "" : "", o.GetProperty("step").GetInt64(), Num("recovery_s"),
                Num("detected_unix"), Num("replan_s"), Num("install_s"), Num("redo_s")));
        else
            Steps.Add(new StepLine(o.GetProperty("step").GetInt64(), Num("loss"), Num("grad_norm"), Num("tokens_per_s"), Num("seconds"), now));
    }
}
