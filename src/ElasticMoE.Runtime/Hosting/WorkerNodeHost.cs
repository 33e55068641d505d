using ElasticMoE.Configuration;
using ElasticMoE.Data;

namespace ElasticMoE.Runtime.Hosting;

/// <summary>
/// A worker node process over its whole life: one <see cref="ClusterNode"/> incarnation after another over
/// the same <see cref="NodeResources"/>. When an incarnation loses its coordinator (the coordinator's
/// process died), the node does not end: it terminates that ActorSystem, keeps its units in memory, and
/// starts a new incarnation that joins the seed nodes again and registers with what it holds, so a
/// coordinator started again on the run directory adopts them (at most the step in flight is redone).
/// After <c>cluster.coordinator-wait</c> seconds without a coordinator, the node ends as before.
/// </summary>
public sealed class WorkerNodeHost
{
    // Terminating a system whose coordinator is dead: the cluster phases of coordinated shutdown cannot
    // complete against a dead leader and time out (3 s each, ClusterNode's config); this bounds the total.
    private static readonly TimeSpan IncarnationTerminateTimeout = TimeSpan.FromSeconds(15);

    private readonly ElasticMoEConfig _config;
    private readonly TextCorpus _corpus;
    private readonly ComputeLoop? _loop;
    private readonly NodeResources _resources;
    private readonly Action<string> _say;
    private volatile bool _ending;
    private volatile ClusterNode _current;

    private WorkerNodeHost(ElasticMoEConfig config, TextCorpus corpus, ComputeLoop? loop, Action<string> say)
    {
        _config = config;
        _corpus = corpus;
        _loop = loop;
        _say = say;
        _resources = new NodeResources(config);
        _current = ClusterNode.Start(config, corpus, coordinator: false, worker: true, loop: loop, resources: _resources);
        Stopped = RunAsync();
    }

    /// <summary>Starts the first incarnation. <paramref name="say"/> receives one line per incarnation change.</summary>
    public static WorkerNodeHost Start(ElasticMoEConfig config, TextCorpus corpus, ComputeLoop? loop, Action<string> say)
        => new(config, corpus, loop, say);

    /// <summary>The incarnation now running.</summary>
    public ClusterNode Current => _current;

    /// <summary>How the node ended: its run's end, a refusal, or a coordinator that did not come back.</summary>
    public Task<RunOutcome> Stopped { get; }

    /// <summary>No further incarnation: the node is being shut down (a signal).</summary>
    public void EndAfterThisIncarnation() => _ending = true;

    private async Task<RunOutcome> RunAsync()
    {
        try
        {
            while (true)
            {
                var node = _current;
                var outcome = await node.Stopped.ConfigureAwait(false);
                bool again = outcome is RunOutcome.CoordinatorLost { WaitedInVain: false } && _config.Cluster.CoordinatorWaitSeconds > 0 && !_ending
                             && _resources.Contexts.Any(c => c.Active);
                if (!again)
                {
                    await node.DisposeAsync().ConfigureAwait(false);
                    return outcome;
                }
                _say($"{outcome.Message}; this node keeps its units and joins {string.Join(", ", _config.Cluster.SeedNodes)} again " +
                     $"(waiting up to {_config.Cluster.CoordinatorWaitSeconds:F0} s for a coordinator)");
                // Down, not leave: leaving needs a convergence the dead coordinator blocks (measured: the old
                // incarnation then lingered ~10 s through coordinated shutdown's cluster phases, and a stand-by
                // coordinator could not take the singleton over until the failure detector and the split-brain
                // resolver removed it). A member that downs itself tells the others at the next gossip and
                // shuts down at once.
                var cluster = Akka.Cluster.Cluster.Get(node.System);
                cluster.Down(cluster.SelfAddress);
                // Every actor of the old incarnation has stopped once its system has terminated: only then
                // may the next one use the units.
                await node.ShutdownAsync(TimeSpan.Zero, IncarnationTerminateTimeout).ConfigureAwait(false);
                if (!node.System.WhenTerminated.IsCompleted)
                    return new RunOutcome.Failed($"{outcome.Message}, and this node's actor system did not stop within {IncarnationTerminateTimeout.TotalSeconds:F0} s");
                if (_ending) return outcome;
                _current = ClusterNode.Start(_config, _corpus, coordinator: false, worker: true, loop: _loop, resources: _resources);
                _say($"node {_current.Address} (a new incarnation) joining {string.Join(", ", _config.Cluster.SeedNodes)}");
            }
        }
        finally
        {
            _resources.Dispose();
        }
    }
}
