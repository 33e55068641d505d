using Akka.Event;
using ElasticMoE.Configuration;
using ElasticMoE.Data;
using ElasticMoE.Planning;
using ElasticMoE.Runtime.DataPlane;
using ElasticMoE.Runtime.Engine;

namespace ElasticMoE.Runtime.Hosting;

/// <summary>
/// What a worker node owns beyond any one ActorSystem: a data-plane endpoint per device and each device's
/// <see cref="WorkerContext"/> (the model, its units with their AdamW moments and applied steps).
/// </summary>
/// <remarks>
/// Why outside the ActorSystem: when the coordinator's process dies, a node's cluster membership dies with
/// it (the nodes cannot join the next coordinator's cluster without a new ActorSystem), but its units are
/// newer than any checkpoint. The node then starts a new incarnation over the same resources
/// (<see cref="WorkerNodeHost"/>), registers with what it holds, and the next coordinator adopts the units
/// in place. The data-plane endpoints stay too, so peers keep dialling the same ports; frames of the dead
/// coordinator's attempts are fenced out by the next plan's epoch.
/// Only one incarnation uses these at a time: the next starts after the last one's ActorSystem terminated,
/// and with it every actor that touched a context.
/// </remarks>
public sealed class NodeResources : IDisposable
{
    private readonly WorkerContext?[] _contexts;
    private volatile ILoggingAdapter? _log;
    private bool _disposed;

    public NodeResources(ElasticMoEConfig config)
    {
        _contexts = new WorkerContext?[config.Cluster.Devices];
        var planes = new List<DataPlaneNode>();
        for (int d = 0; d < config.Cluster.Devices; d++)
            planes.Add(DataPlaneNode.Start(new DataPlaneOptions
            {
                Host = config.Cluster.Host,
                AdvertisedHost = config.Cluster.PublicHost.Length > 0 ? config.Cluster.PublicHost : null,
                NodeId = d,
                MaxFrameBytes = (long)config.Cluster.MaxFrameMb << 20,
                MaxBufferedBytesPerConnection = (long)config.Cluster.MaxFrameMb << 20,
            }.WithAkkaLog(() => _log)));   // the current incarnation's log (one that terminated logs nothing more)
        DataPlanes = planes;
    }

    public IReadOnlyList<DataPlaneNode> DataPlanes { get; }

    /// <summary>Where the current incarnation's data-plane log lines go.</summary>
    public void UseLog(ILoggingAdapter log) => _log = log;

    /// <summary>
    /// Device <paramref name="device"/>'s context, bound to the worker identity of the incarnation asking:
    /// built on first use, and afterwards the same units under the new identity.
    /// </summary>
    public WorkerContext Context(int device, ElasticMoEConfig config, TextCorpus corpus, WorkerId id, CancellationToken stopping)
    {
        lock (_contexts)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            if (_contexts[device] is { } existing)
            {
                existing.Rebind(id, stopping);
                return existing;
            }
            return _contexts[device] = new WorkerContext(config, corpus, DataPlanes[device], id, stopping);
        }
    }

    /// <summary>The contexts built so far (a device whose worker never started has none).</summary>
    public IReadOnlyList<WorkerContext> Contexts
    {
        get { lock (_contexts) return _contexts.OfType<WorkerContext>().ToList(); }
    }

    public void Dispose()
    {
        lock (_contexts)
        {
            if (_disposed) return;
            _disposed = true;
            foreach (var c in _contexts) c?.Dispose();
            foreach (var d in DataPlanes) d.Dispose();
        }
    }
}
