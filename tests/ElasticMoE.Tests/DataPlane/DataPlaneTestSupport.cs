using System.Collections.Concurrent;
using System.Net.Sockets;
using ElasticMoE.Runtime.DataPlane;

namespace ElasticMoE.Tests.DataPlane;

/// <summary>Collects a node's log lines so tests can assert what it reported.</summary>
internal sealed class TestLog
{
    private readonly ConcurrentQueue<(DataPlaneLogLevel Level, string Message)> _lines = new();

    public DataPlaneLog Sink => (level, message, _) => _lines.Enqueue((level, message));

    public IReadOnlyList<(DataPlaneLogLevel Level, string Message)> Lines => _lines.ToArray();

    public bool Contains(string fragment) => _lines.Any(l => l.Message.Contains(fragment, StringComparison.OrdinalIgnoreCase));

    public override string ToString() => string.Join(Environment.NewLine, _lines.Select(l => $"{l.Level}: {l.Message}"));
}

/// <summary>n data-plane nodes on 127.0.0.1 and the group they form.</summary>
internal sealed class LoopbackCluster : IAsyncDisposable
{
    public LoopbackCluster(int size, DataPlaneOptions? options = null, CollectiveOptions? collectiveOptions = null)
    {
        Nodes = Enumerable.Range(0, size)
            .Select(i => DataPlaneNode.Start((options ?? new DataPlaneOptions()) with { NodeId = i }))
            .ToArray();
        var members = Nodes.Select(n => n.Endpoint).ToArray();
        Groups = Enumerable.Range(0, size).Select(i => new CollectiveGroup(Nodes[i], members, i, collectiveOptions)).ToArray();
    }

    public DataPlaneNode[] Nodes { get; }
    public CollectiveGroup[] Groups { get; }

    public async ValueTask DisposeAsync()
    {
        foreach (var node in Nodes) await node.DisposeAsync();
    }
}

internal static class TestTimeouts
{
    public static readonly TimeSpan Default = TimeSpan.FromSeconds(20);

    public static Task<T> Within<T>(this Task<T> task) => task.WaitAsync(Default);
    public static Task Within(this Task task) => task.WaitAsync(Default);

    /// <summary>True once the peer has closed: a read returns 0 or the connection is reset.</summary>
    public static async Task<bool> WaitUntilClosedByPeerAsync(Socket socket, TimeSpan timeout)
    {
        var buffer = new byte[4096];
        using var cts = new CancellationTokenSource(timeout);
        try
        {
            while (true)
            {
                var n = await socket.ReceiveAsync(buffer, SocketFlags.None, cts.Token);
                if (n == 0) return true;
            }
        }
        catch (SocketException)
        {
            return true;
        }
        catch (OperationCanceledException)
        {
            return false;
        }
    }

    public static async Task Eventually(Func<bool> condition, string what, TimeSpan? timeout = null)
    {
        var deadline = DateTime.UtcNow + (timeout ?? Default);
        while (!condition())
        {
            if (DateTime.UtcNow > deadline) throw new TimeoutException($"Timed out waiting for: {what}");
            await Task.Delay(10);
        }
    }
}
