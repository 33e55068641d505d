using Akka.Actor;
using Akka.Configuration;
using ElasticMoE.Runtime.Actors;
using ElasticMoE.Runtime.Protocol;
using ElasticMoE.Runtime.Serialization;

namespace ElasticMoE.Runtime.Hosting;

/// <summary>The shell could not reach a <see cref="ShellEndpoint"/> at the address it was given.</summary>
public sealed class ShellUnreachableException(string message) : Exception(message);

/// <summary>
/// The client side of <c>elasticmoe shell</c>: an ActorSystem of its own that talks to the
/// <see cref="ShellEndpoint"/> of a coordinator-role node over Akka.Remote, with our serializer.
/// </summary>
/// <remarks>
/// A remoting client (<c>actor.provider = remote</c>), not a cluster member, on purpose: a member with a
/// "shell" role would still take part in gossip, count in the split-brain resolver's decisions, be downed
/// (and hold up convergence) when the shell's laptop sleeps, and a mistake in its roles could make it the
/// oldest coordinator-role member and so the singleton's host. A remoting client can never become the
/// oldest, the leader or the coordinator, is never planned, and leaves no trace in the cluster when it
/// goes: the shell only ever sends requests to one actor and reads the replies.
/// </remarks>
public sealed class ShellClient : IAsyncDisposable
{
    private readonly ActorSystem _system;
    private readonly IActorRef _endpoint;
    private readonly TimeSpan _timeout;

    public string Target { get; }

    private ShellClient(ActorSystem system, IActorRef endpoint, string target, TimeSpan timeout)
    {
        _system = system;
        _endpoint = endpoint;
        Target = target;
        _timeout = timeout;
    }

    /// <summary>The endpoint's actor path for HOST:PORT, or an akka.tcp:// address as it is.</summary>
    /// <exception cref="FormatException">Neither.</exception>
    public static string EndpointPath(string connect)
    {
        if (connect.StartsWith("akka.tcp://", StringComparison.Ordinal))
            return connect.TrimEnd('/') + ShellEndpoint.Path;
        int colon = connect.LastIndexOf(':');
        if (colon <= 0 || !int.TryParse(connect.AsSpan(colon + 1), out int port) || port is <= 0 or > 65535)
            throw new FormatException($"--connect expects HOST:PORT (the coordinator's Akka remoting port), got '{connect}'");
        return $"akka.tcp://{ClusterNode.SystemName}@{connect[..colon]}:{port}{ShellEndpoint.Path}";
    }

    /// <summary>Starts the client system and finds the endpoint within <paramref name="timeout"/>.</summary>
    /// <param name="bindHost">Address this client binds and the endpoint replies to (loopback unless told).</param>
    /// <exception cref="ShellUnreachableException">No endpoint answered in time.</exception>
    public static async Task<ShellClient> ConnectAsync(string connect, TimeSpan timeout, string bindHost = "127.0.0.1")
    {
        var path = EndpointPath(connect);
        var system = ActorSystem.Create("elasticmoe-shell", ClientConfig(bindHost));
        try
        {
            var endpoint = await system.ActorSelection(path).ResolveOne(timeout).ConfigureAwait(false);
            return new ShellClient(system, endpoint, connect, timeout);
        }
        catch (Exception ex) when (ex is ActorNotFoundException or TaskCanceledException or TimeoutException or AskTimeoutException)
        {
            await Terminate(system).ConfigureAwait(false);
            throw new ShellUnreachableException($"no ElasticMoE coordinator answered at {connect} within {timeout.TotalSeconds:0.#} s " +
                                                "(is `elasticmoe train` running there, and is this its Akka remoting port?)");
        }
    }

    /// <summary>
    /// Sends <paramref name="request"/> and waits for the reply (a <see cref="ShellError"/> when the endpoint could not get one):
    /// the timeout, or for an <see cref="IShellLongRequest"/> as long as the endpoint waits for it.
    /// </summary>
    /// <exception cref="ShellUnreachableException">No reply within the timeout.</exception>
    public async Task<IElasticMoEMessage> AskAsync(IElasticMoEMessage request)
    {
        var timeout = request is IShellLongRequest ? IShellLongRequest.LongTimeout + _timeout : _timeout;
        try
        {
            return await _endpoint.Ask<IElasticMoEMessage>(request, timeout).ConfigureAwait(false);
        }
        catch (Exception ex) when (ex is AskTimeoutException or TaskCanceledException or TimeoutException)
        {
            throw new ShellUnreachableException($"{Target} did not answer within {timeout.TotalSeconds:0.#} s");
        }
    }

    public async ValueTask DisposeAsync() => await Terminate(_system).ConfigureAwait(false);

    private static async Task Terminate(ActorSystem system)
    {
        try { await system.Terminate().WaitAsync(TimeSpan.FromSeconds(5)).ConfigureAwait(false); }
        catch (TimeoutException) { /* the process is ending; its sockets close with it */ }
    }

    private static Config ClientConfig(string bindHost)
    {
        // Logging off: association failures to an unreachable address would otherwise print to stdout,
        // into output that scripts parse (--json); the shell says what went wrong itself.
        var hocon = $$"""
            akka {
              loglevel = OFF
              stdout-loglevel = OFF
              actor.provider = remote
              coordinated-shutdown.run-by-clr-shutdown-hook = off
              remote.dot-netty.tcp { hostname = "{{bindHost}}", port = 0 }
            }
            """;
        return ConfigurationFactory.ParseString(hocon).WithFallback(ElasticMoESerialization.Config);
    }
}
