using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using ElasticMoE.Runtime.Hosting;
using ElasticMoE.Runtime.Protocol;

namespace ElasticMoE.Cli;

// The shell's further read commands: their arguments, train watch's loop, the heatmap's PNG, and the node
// addresses the REPL completes (learnt from `cluster show` and `workers` replies).
internal sealed partial class ShellSession
{
    /// <summary>How long <c>train watch</c> runs without a terminal (a script) when not bounded by --steps or --seconds.</summary>
    public const int DefaultWatchSeconds = 60;

    private readonly SortedSet<string> _nodes = new(StringComparer.Ordinal);

    /// <summary>The options a read command was given (each "--name value" once) and its positional arguments.</summary>
    private static (Dictionary<string, string> Options, List<string> Positional) Parse(string[] args, string[] options, int positional)
    {
        var given = new Dictionary<string, string>(StringComparer.Ordinal);
        var rest = new List<string>();
        for (int i = 0; i < args.Length; i++)
        {
            if (args[i].StartsWith("--", StringComparison.Ordinal))
            {
                if (!options.Contains(args[i])) throw new UsageException($"unknown option '{args[i]}'");
                if (i + 1 >= args.Length) throw new UsageException($"{args[i]} needs a value");
                if (!given.TryAdd(args[i], args[++i])) throw new UsageException($"{args[i - 1]} given twice");
            }
            else if (rest.Count < positional) rest.Add(args[i]);
            else throw new UsageException($"unexpected argument '{args[i]}'");
        }
        return (given, rest);
    }

    private static long Step(string what, string text) =>
        long.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out long v) ? v : throw new UsageException($"{what} expects a step number, got '{text}'");

    private static double Seconds(string what, string text) =>
        double.TryParse(text, NumberStyles.Float, CultureInfo.InvariantCulture, out double v) && v > 0 && double.IsFinite(v)
            ? v : throw new UsageException($"{what} expects a positive number of seconds, got '{text}'");

    /// <summary>A command whose reply (already printed, JSON included) says it failed: the reason on stderr, exit 1.</summary>
    private int Failing(string message)
    {
        stderr.WriteLine($"error: {message}");
        return ShellCommand.Failed;
    }

    private static IElasticMoEMessage WatchArgs(string[] args)
    {
        var (o, _) = Parse(args, ["--steps", "--seconds", "--interval"], 0);
        if (o.TryGetValue("--steps", out var n) && Step("--steps", n) == 0) throw new UsageException("--steps expects at least 1");
        if (o.TryGetValue("--seconds", out var s)) Seconds("--seconds", s);
        if (o.TryGetValue("--interval", out var i)) Seconds("--interval", i);
        return new ShellTrainStatusQuery();
    }

    /// <summary>
    /// <c>train watch</c>: asks for the status every interval (0.5 s) and prints it whenever it changed (step, phase, stop), until a
    /// key is pressed (on a terminal), --steps more steps are committed, --seconds pass, or the run ends (or, without a terminal
    /// and unbounded, <see cref="DefaultWatchSeconds"/>). Exit 0 at any of those.
    /// </summary>
    private static int Watch(ShellSession session, ShellClient client, string[] args) => session.Watch(client, args);

    private int Watch(ShellClient client, string[] args)
    {
        var (o, _) = Parse(args, ["--steps", "--seconds", "--interval"], 0);
        long? steps = o.TryGetValue("--steps", out var n) ? Step("--steps", n) : null;
        double? seconds = o.TryGetValue("--seconds", out var s) ? Seconds("--seconds", s) : null;
        var interval = TimeSpan.FromSeconds(o.TryGetValue("--interval", out var i) ? Seconds("--interval", i) : 0.5);
        bool keys = KeysReadable();
        if (!keys && steps is null && seconds is null) seconds = DefaultWatchSeconds;
        if (keys && !json) stdout.WriteLine("watching; press a key to stop");
        var clock = Stopwatch.StartNew();
        long? first = null;
        string? shown = null;
        while (true)
        {
            IElasticMoEMessage reply;
            try
            {
                reply = client.AskAsync(new ShellTrainStatusQuery()).GetAwaiter().GetResult();
            }
            catch (ShellUnreachableException ex)
            {
                Fail(ex.Message);
                return ShellCommand.Unusable;
            }
            if (reply is ShellError e)
            {
                if (first is null) return Fail(e.Message);
                if (!json) stdout.WriteLine($"the coordinator is gone: {e.Message}");
                return 0;
            }
            var status = (ShellTrainStatus)reply;
            first ??= status.Step;
            var key = $"{status.Step} {status.Phase} {status.Stopping}";
            if (key != shown)
            {
                Show(status);
                stdout.Flush();
                shown = key;
            }
            if (status.Phase == "done" || (steps is { } more && status.Step >= first + more) || (seconds is { } limit && clock.Elapsed.TotalSeconds >= limit))
                return 0;
            var until = clock.Elapsed + interval;
            while (clock.Elapsed < until)
            {
                if (keys && Console.KeyAvailable)
                {
                    Console.ReadKey(intercept: true);
                    return 0;
                }
                Thread.Sleep(20);
            }
        }
    }

    private static bool KeysReadable()
    {
        if (Console.IsInputRedirected) return false;
        try
        {
            _ = Console.KeyAvailable;
            return true;
        }
        catch (InvalidOperationException)
        {
            return false;
        }
    }

    private static IElasticMoEMessage HeatmapArgs(string[] args)
    {
        Parse(args, ["--png"], 0);
        return new ShellExpertHeatmapQuery();
    }

    private static int WriteHeatmap(ShellSession session, IElasticMoEMessage reply, string[] args) => session.WriteHeatmap(reply, args);

    private int WriteHeatmap(IElasticMoEMessage reply, string[] args)
    {
        if (!Parse(args, ["--png"], 0).Options.TryGetValue("--png", out var path)) return 0;
        if (reply is not ShellExpertHeatmap { Step: >= 0 } h) return Fail("no step committed yet: no heatmap to write");
        try
        {
            ShellReadText.WriteHeatmapPng(h, path, new PlotSize(PlotCommand.DefaultWidth, PlotCommand.DefaultHeight));
        }
        catch (Exception ex) when (ex is IOException or UnauthorizedAccessException)
        {
            return Fail($"cannot write {path}: {ex.Message}");
        }
        if (!json) stdout.WriteLine($"wrote {path}");
        return 0;
    }

    private static IElasticMoEMessage VerifyArgs(string[] args)
    {
        var (_, p) = Parse(args, [], 1);
        return new ShellCheckpointsVerifyQuery(p.Count == 0 ? -1 : Step("checkpoints verify", p[0]));
    }

    private static IElasticMoEMessage EventsArgs(string[] args)
    {
        var (o, _) = Parse(args, ["--since"], 0);
        return new ShellEventsQuery(o.TryGetValue("--since", out var s) ? Step("--since", s) : 0);
    }

    private static IElasticMoEMessage ActorsTreeArgs(string[] args)
    {
        var (o, p) = Parse(args, ["--node"], 1);
        var path = p.Count == 0 ? "/user" : p[0];
        if (!path.StartsWith('/')) throw new UsageException($"an actor path starts with '/', got '{path}'");
        return new ShellActorTreeQuery(o.GetValueOrDefault("--node", ""), path);
    }

    // Node addresses for completion: the cluster's members when the REPL starts, and from every reply that lists nodes.
    private void LearnNodes(ShellClient client)
    {
        try
        {
            Learn(client.AskAsync(new ShellClusterQuery()).GetAwaiter().GetResult());
        }
        catch (ShellUnreachableException)
        {
            // The first command will say so.
        }
    }

    private void Learn(IElasticMoEMessage reply)
    {
        var nodes = reply switch
        {
            ShellCluster c => c.Members.Select(m => m.Address),
            ShellWorkers w => w.Workers.Select(x => x.Node),
            _ => [],
        };
        _nodes.UnionWith(nodes);
    }
}

/// <summary>
/// What tab completes in the REPL: command names, and a node's address (or its HOST:PORT) where one is expected:
/// after <c>--node</c>, and as the argument of <c>node leave|down</c> and <c>fault kill-worker</c>.
/// </summary>
public static class ShellCompleter
{
    private static readonly string[] AddressVerbs = ["node leave", "node down", "fault kill-worker"];

    /// <summary>Every full line that completes <paramref name="typed"/>.</summary>
    public static IReadOnlyList<string> Candidates(string typed, IEnumerable<string> commands, IEnumerable<string> nodes)
    {
        int last = typed.LastIndexOf(' ');
        var before = last > 0 ? typed[..last].TrimEnd() : "";
        if (last > 0 && (before.EndsWith(" --node", StringComparison.Ordinal) || AddressVerbs.Contains(before.TrimStart())))
        {
            var head = typed[..(last + 1)];
            var word = typed[(last + 1)..];
            return nodes.Select(a => a.StartsWith(word, StringComparison.Ordinal) ? a
                    : HostPort(a) is { } hp && hp.StartsWith(word, StringComparison.Ordinal) ? hp : null)
                .OfType<string>().Distinct().Order(StringComparer.Ordinal).Select(a => head + a).ToList();
        }
        return commands.Where(n => n.StartsWith(typed, StringComparison.Ordinal)).ToList();
    }

    // akka.tcp://system@host:port -> host:port
    private static string? HostPort(string address) => address.IndexOf('@') is var at and >= 0 ? address[(at + 1)..] : null;
}
