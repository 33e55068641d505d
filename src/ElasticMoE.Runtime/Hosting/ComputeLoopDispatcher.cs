using Akka.Actor;
using Akka.Configuration;
using Akka.Dispatch;

namespace ElasticMoE.Runtime.Hosting;

/// <summary>
/// An Akka dispatcher whose actors run on a <see cref="ComputeLoop"/>'s thread: the pipeline stage and
/// the private expert shards of the worker that owns the loop. Their messages are then handled where
/// their torch work runs, with no hand-over between threads.
/// </summary>
public static class ComputeLoopDispatcher
{
    public const string Id = "elasticmoe-compute-loop-dispatcher";

    /// <summary>Makes <see cref="Id"/> available in <paramref name="system"/>, running on <paramref name="loop"/>.</summary>
    public static void Register(ActorSystem system, ComputeLoop loop)
    {
        // Throughput 1: the loop serves one message, then whatever else is queued (another actor's turn).
        var config = ConfigurationFactory.ParseString($"id = {Id}\nthroughput = 1")
            .WithFallback(system.Dispatchers.DefaultDispatcherConfig);
        system.Dispatchers.RegisterConfigurator(Id, new Configurator(config, system.Dispatchers.Prerequisites, loop));
    }

    private sealed class Configurator : MessageDispatcherConfigurator
    {
        private readonly MessageDispatcher _dispatcher;

        public Configurator(Config config, IDispatcherPrerequisites prerequisites, ComputeLoop loop) : base(config, prerequisites)
            => _dispatcher = new Dispatcher(this, Id, 1, null, new Factory(loop), TimeSpan.FromSeconds(1));

        public override MessageDispatcher Dispatcher() => _dispatcher;
    }

    private sealed class Factory(ComputeLoop loop) : ExecutorServiceFactory
    {
        public override ExecutorService Produce(string id) => new Service(id, loop);
    }

    private sealed class Service(string id, ComputeLoop loop) : ExecutorService(id)
    {
        public override void Execute(IRunnable run) => loop.Post(run.Run);

        public override void Shutdown() { }
    }
}
