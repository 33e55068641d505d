using System.CommandLine;
using System.Globalization;
using System.Text.Json;
using System.Text.Json.Serialization;
using ElasticMoE.Planning;
using ElasticMoE.Runtime.Hosting;
using ElasticMoE.Runtime.Protocol;

namespace ElasticMoE.Cli;

/// <summary>
/// <c>elasticmoe shell --connect HOST:PORT</c>: query and steer a running cluster, one-shot
/// (<c>-c "cmd; cmd"</c>) or as a REPL. Exit codes: 0 every command succeeded, 1 a command failed or was
/// refused (unknown command, wrong arguments, no token, the coordinator's error), 2 the shell's own command
/// line is wrong or the address does not answer.
/// </summary>
public static class ShellCommand
{
    public const int Failed = 1;
    public const int Unusable = 2;
    public const string TokenVariable = "ELASTICMOE_SHELL_TOKEN";

    public static Command Create(TextWriter stdout, TextWriter stderr)
    {
        var connect = new Option<string?>("--connect") { Description = "HOST:PORT of a coordinator node's Akka remoting port (or akka.tcp://elasticmoe@HOST:PORT)" };
        var commands = new Option<string?>("--command", "-c") { Description = "run these commands (separated by ';') and exit" };
        var json = new Option<bool>("--json") { Description = "print every reply as one JSON object a line" };
        var token = new Option<string?>("--token") { Description = $"the shell token control commands need (default: ${TokenVariable})" };
        var timeout = new Option<double?>("--timeout") { Description = "seconds to wait for the address and for each reply (default 10)" };
        var bind = new Option<string?>("--bind") { Description = "address this shell binds and is answered on (default 127.0.0.1)" };
        var cmd = new Command("shell", "query and steer a running cluster: cluster show, workers, plan, train status|watch|pause|resume|stop, " +
            "experts loads|heatmap, checkpoints list|verify, events, actors tree, diagnose, rebalance now, checkpoint now, relayout WxP, " +
            "node leave|down ADDRESS, fault kill-worker ADDRESS");
        foreach (var o in new Option[] { connect, commands, json, token, timeout, bind }) cmd.Options.Add(o);
        cmd.SetAction(p =>
        {
            if (p.GetValue(connect) is not { Length: > 0 } target)
            {
                stderr.WriteLine("error: elasticmoe shell needs --connect HOST:PORT (the coordinator's Akka remoting port)");
                return Unusable;
            }
            double seconds = p.GetValue(timeout) ?? 10;
            if (!(seconds > 0))
            {
                stderr.WriteLine("error: --timeout must be a positive number of seconds");
                return Unusable;
            }
            var session = new ShellSession(stdout, stderr, p.GetValue(json), p.GetValue(token) ?? Environment.GetEnvironmentVariable(TokenVariable) ?? "");
            return session.Run(target, TimeSpan.FromSeconds(seconds), p.GetValue(bind) ?? "127.0.0.1", p.GetValue(commands));
        });
        return cmd;
    }
}

/// <summary>One shell session: the command table, parsing a line, printing a reply as text or JSON.</summary>
internal sealed partial class ShellSession(TextWriter stdout, TextWriter stderr, bool json, string token)
{
    private sealed record Verb(string Name, string Usage, string Help, Func<string[], IElasticMoEMessage> Request)
    {
        /// <summary>After the reply is printed: the command's exit code from it and the arguments (none: 0).</summary>
        public Func<ShellSession, IElasticMoEMessage, string[], int>? Verdict { get; init; }

        /// <summary>A command that talks to the endpoint itself (its Request only checks the arguments).</summary>
        public Func<ShellSession, ShellClient, string[], int>? Run { get; init; }
    }

    /// <summary>A command line a verb cannot use: printed with its usage, the command fails.</summary>
    private sealed class UsageException(string message) : Exception(message);

    private static readonly JsonSerializerOptions Json = new()
    {
        PropertyNamingPolicy = JsonNamingPolicy.CamelCase,
        NumberHandling = JsonNumberHandling.AllowNamedFloatingPointLiterals,
    };

    private readonly Verb[] _verbs =
    [
        new("cluster show", "cluster show", "members: address, status, roles, reachability; the leader; uptime", NoArgs(new ShellClusterQuery())),
        new("workers", "workers", "workers: node, device, rank, stage, replica, blocks, experts and units held", NoArgs(new ShellWorkersQuery())),
        new("plan", "plan", "the plan in force: epoch, DP x PP, stage ranges, expert placement per layer", NoArgs(new ShellPlanQuery())),
        new("train status", "train status", "step, loss, validation loss, tokens/s, ETA, redone attempts, phase", NoArgs(new ShellTrainStatusQuery())),
        new("experts loads", "experts loads [--layer L]", "tokens per expert of the last committed step (MoE block L only)", ExpertLoads),
        new("checkpoints list", "checkpoints list", "committed checkpoints of the run", NoArgs(new ShellCheckpointsQuery())),
        new("train pause", "train pause", "finish the step in flight, then start no new one until resumed (token)", a => Control("pause", a, token)),
        new("train resume", "train resume", "continue a paused run (token)", a => Control("resume", a, token)),
        new("train stop", "train stop", "end the run after the step in flight, as a SIGTERM does (token)", a => Control("stop", a, token)),
        new("rebalance now", "rebalance now [--dry-run] [--token T]", "re-place experts by load at the next step boundary (token); --dry-run: what it would do", Rebalance(token)),
        new("checkpoint now", "checkpoint now", "checkpoint at the next step boundary; runs with --run-dir (token)", a => Control("checkpoint", a, token)),
        // Read commands of ShellSession.Read.cs.
        new("train watch", "train watch [--steps N] [--seconds S] [--interval S]",
            $"train status as it changes, until a key, N more steps, S seconds or the run's end (no terminal: at most {DefaultWatchSeconds} s unless bounded)",
            WatchArgs) { Run = Watch },
        new("experts heatmap", "experts heatmap [--png FILE]", "tokens per expert per step over the load window, layers x experts, coloured; --png FILE writes it as a PNG",
            HeatmapArgs) { Verdict = WriteHeatmap },
        new("checkpoints verify", "checkpoints verify [STEP]", "check the committed checkpoints' files (sizes, SHA-256) against their manifests; fails naming each bad file",
            VerifyArgs) { Verdict = (s, r, _) => r is ShellCheckpointsVerified { Ok: false } v ? s.Failing($"{v.Checkpoints.Count(c => !c.Ok)} checkpoint(s) do not verify") : 0 },
        new("events", "events [--since STEP]", "the run's journaled events (joins, losses, plans, rebalances, checkpoints, restarts) with sequence numbers", EventsArgs),
        new("actors tree", "actors tree [PATH] [--node ADDRESS]", "the actor hierarchy under PATH (default /user) of every node, or of one", ActorsTreeArgs),
        new("diagnose", "diagnose", "per node pass/slow/fail: membership, reachability, registration, data plane; the run's progress",
            NoArgs(new ShellDiagnoseQuery())) { Verdict = (s, r, _) => r is ShellDiagnosis { Ok: false } ? s.Failing("not every node passes") : 0 },
        // Control commands with an argument: carried out at a step boundary, journaled like the others.
        new("relayout", "relayout WORKERSxPP", "re-plan to WORKERS workers as DP x PP at the next step boundary, e.g. relayout 2x1 (token)",
            ControlWith("relayout", "a layout WORKERSxPP", Layout, token)),
        new("node leave", "node leave ADDRESS", "the node hands its units over at the next step boundary and leaves, as on its SIGTERM (token)",
            ControlWith("node-leave", "a node address (host:port)", a => [a], token)),
        new("node down", "node down ADDRESS[,ADDRESS...]", "down the node(s) at the next step boundary, all at once: the run recovers as from lost nodes (token)",
            ControlWith("node-down", "a node address (host:port)", a => a.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries), token)),
        new("fault kill-worker", "fault kill-worker ADDRESS", "recovery drill: the node process SIGKILLs itself at the next step boundary (token)",
            ControlWith("fault-kill-worker", "a node address (host:port)", a => [a], token)),
    ];

    private static readonly string[] SessionWords = ["help", "exit", "quit"];

    public IEnumerable<string> Names => _verbs.Select(v => v.Name).Concat(SessionWords);

    public int Run(string target, TimeSpan timeout, string bindHost, string? oneShot)
    {
        ShellClient client;
        try
        {
            client = ShellClient.ConnectAsync(target, timeout, bindHost).GetAwaiter().GetResult();
        }
        catch (Exception ex) when (ex is ShellUnreachableException or FormatException)
        {
            stderr.WriteLine($"error: {ex.Message}");
            return ShellCommand.Unusable;
        }
        try
        {
            if (oneShot is not null)
            {
                int worst = 0;
                foreach (var line in oneShot.Split(';', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
                {
                    worst = Math.Max(worst, Execute(client, line));
                    if (worst == ShellCommand.Unusable) break;
                }
                return worst;
            }
            return Repl(client);
        }
        finally
        {
            client.DisposeAsync().AsTask().GetAwaiter().GetResult();
        }
    }

    private int Repl(ShellClient client)
    {
        LearnNodes(client);
        var editor = new LineEditor(typed => ShellCompleter.Candidates(typed, Names, _nodes));
        if (!json) stdout.WriteLine($"connected to {client.Target}; 'help' lists the commands, 'exit' leaves");
        int last = 0;
        while (editor.ReadLine("elasticmoe> ") is { } line)
        {
            var trimmed = line.Trim();
            if (trimmed.Length == 0) continue;
            if (trimmed is "exit" or "quit") break;
            last = Execute(client, trimmed);
            stdout.Flush();
        }
        return last == ShellCommand.Unusable ? last : 0;
    }

    /// <summary>Runs one command line and prints its reply: 0 done, 1 failed or refused, 2 the endpoint stopped answering.</summary>
    public int Execute(ShellClient client, string line)
    {
        var words = line.Split(' ', StringSplitOptions.RemoveEmptyEntries);
        if (words.Length == 0) return 0;
        if (words is ["help", ..])
        {
            PrintHelp();
            return 0;
        }
        var verb = _verbs.Where(v => Matches(v.Name, words)).MaxBy(v => v.Name.Length);
        if (verb is null) return Fail($"unknown command '{line}'{Suggestion(words)}");
        IElasticMoEMessage request;
        var args = words[verb.Name.Split(' ').Length..];
        try
        {
            request = verb.Request(args);
        }
        catch (UsageException ex)
        {
            return Fail($"{ex.Message}; usage: {verb.Usage}");
        }
        if (verb.Run is { } run) return run(this, client, args);
        IElasticMoEMessage reply;
        try
        {
            reply = client.AskAsync(request).GetAwaiter().GetResult();
        }
        catch (ShellUnreachableException ex)
        {
            Fail(ex.Message);
            return ShellCommand.Unusable;
        }
        switch (reply)
        {
            case ShellError e: return Fail(e.Message);
            case ShellAck { Ok: false } a: return Fail(a.Message);
            case ShellRebalancePreview { Possible: false } r: return Fail($"no rebalance possible: {r.Message}");
        }
        Show(reply);
        return verb.Verdict?.Invoke(this, reply, args) ?? 0;
    }

    private void Show(IElasticMoEMessage reply)
    {
        Learn(reply);
        if (json) stdout.WriteLine(JsonSerializer.Serialize(reply, reply.GetType(), Json));
        else ShellText.Print(stdout, reply);
    }

    private int Fail(string message)
    {
        if (json) stdout.WriteLine(JsonSerializer.Serialize(new { error = message }, Json));
        stderr.WriteLine($"error: {message}");
        return ShellCommand.Failed;
    }

    private void PrintHelp()
    {
        foreach (var v in _verbs)
            stdout.WriteLine(v.Usage.Length <= 28 ? $"  {v.Usage,-28} {v.Help}" : $"  {v.Usage}\n  {"",-28} {v.Help}");
        stdout.WriteLine($"  {"help",-28} this list");
        stdout.WriteLine($"  {"exit, quit",-28} leave the shell");
        stdout.WriteLine("control commands need the coordinator's shell token: --token T or $" + ShellCommand.TokenVariable);
    }

    private static bool Matches(string name, string[] words)
    {
        var parts = name.Split(' ');
        return words.Length >= parts.Length && parts.Zip(words).All(t => t.First == t.Second);
    }

    /// <summary>"; did you mean 'y'?" for the command name closest to what was typed (by edit distance), if any is close.</summary>
    private string Suggestion(string[] words)
    {
        var best = Names.Select(n =>
        {
            int k = Math.Min(n.Split(' ').Length, words.Length);
            return (Name: n, Distance: EditDistance(string.Join(' ', words[..k]), n));
        }).MinBy(t => t.Distance);
        return best.Distance <= Math.Max(2, best.Name.Length / 2) ? $"; did you mean '{best.Name}'?" : "; 'help' lists the commands";
    }

    public static int EditDistance(string a, string b)
    {
        var d = new int[b.Length + 1];
        for (int j = 0; j <= b.Length; j++) d[j] = j;
        for (int i = 1; i <= a.Length; i++)
        {
            int diagonal = d[0];
            d[0] = i;
            for (int j = 1; j <= b.Length; j++)
            {
                int above = d[j];
                d[j] = Math.Min(Math.Min(d[j] + 1, d[j - 1] + 1), diagonal + (a[i - 1] == b[j - 1] ? 0 : 1));
                diagonal = above;
            }
        }
        return d[b.Length];
    }

    private static Func<string[], IElasticMoEMessage> NoArgs(IElasticMoEMessage request) => args =>
        args.Length == 0 ? request : throw new UsageException($"unexpected argument '{args[0]}'");

    private static IElasticMoEMessage ExpertLoads(string[] args) => args switch
    {
        [] => new ShellExpertLoadsQuery(-1),
        ["--layer", var l] when int.TryParse(l, NumberStyles.None, CultureInfo.InvariantCulture, out int layer) => new ShellExpertLoadsQuery(layer),
        ["--layer", var l] => throw new UsageException($"--layer expects a block number, got '{l}'"),
        _ => throw new UsageException($"unexpected argument '{string.Join(' ', args)}'"),
    };

    private static Func<string[], IElasticMoEMessage> Rebalance(string token) => args => args switch
    {
        ["--dry-run"] => new ShellRebalanceQuery(),
        _ => Control("rebalance", args, token),
    };

    /// <summary>A control command with one argument (<paramref name="what"/>), turned into the request's arguments by <paramref name="parse"/>.</summary>
    private static Func<string[], IElasticMoEMessage> ControlWith(string action, string what, Func<string, string[]> parse, string token) => args =>
    {
        var (value, given) = args switch
        {
            [var v] when !v.StartsWith("--", StringComparison.Ordinal) => (v, token),
            [var v, "--token", var t] when !v.StartsWith("--", StringComparison.Ordinal) => (v, t),
            ["--token", var t, var v] => (v, t),
            [] or ["--token", _] => throw new UsageException($"missing {what}"),
            _ => throw new UsageException($"unexpected argument '{string.Join(' ', args)}'"),
        };
        return new ShellControlCommand(action, parse(value), given);
    };

    private static string[] Layout(string text)
    {
        try
        {
            var (workers, pp) = RelayoutSchedule.ParseLayout(text);
            return [workers.ToString(CultureInfo.InvariantCulture), pp.ToString(CultureInfo.InvariantCulture)];
        }
        catch (FormatException ex)
        {
            throw new UsageException(ex.Message);
        }
    }

    private static IElasticMoEMessage Control(string action, string[] args, string token)
    {
        var given = args switch
        {
            [] => token,
            ["--token", var t] => t,
            _ => throw new UsageException($"unexpected argument '{string.Join(' ', args)}'"),
        };
        return new ShellControl(action, given);
    }
}
