using ElasticMoE.Data;
using ElasticMoE.Training;

namespace ElasticMoE.Tests.Training;

/// <summary>
/// TorchSharp passes a Scalar's native handle to libtorch without keeping the managed Scalar alive, so
/// a Scalar nobody references any more (an implicit conversion: <c>x * 0.5</c>, <c>x.pow(2)</c>) can be
/// finalized by a garbage collection that another thread triggers while the op is still reading it.
/// Actors allocate all the time, so in a cluster that is not hypothetical. Steps must be immune.
/// </summary>
public class GcPressureTests
{
    [Fact]
    public void Training_steps_are_identical_while_other_threads_force_garbage_collections()
    {
        // A tiny model, many steps: thousands of Scalar-taking ops a second.
        const int steps = 300;
        var cfg = TestSupport.SmallConfig(("train.steps", $"{steps}"), ("model.d-model", "16"), ("model.heads", "2"), ("model.context", "8"),
            ("model.dense-hidden", "16"), ("model.moe.expert-hidden", "8"), ("train.global-batch", "2"), ("train.micro-batch", "1"));
        var corpus = TextCorpus.Default(cfg.Data.ValidationFraction, cfg.Model.Context);
        List<double> Run(bool pressure)
        {
            using var stop = new CancellationTokenSource();
            var hammer = pressure
                ? Task.Factory.StartNew(() =>
                {
                    while (!stop.IsCancellationRequested)
                    {
                        GC.Collect();
                        GC.WaitForPendingFinalizers();
                    }
                }, TaskCreationOptions.LongRunning)
                : Task.CompletedTask;
            try
            {
                using var t = new Trainer(cfg, corpus);
                return Enumerable.Range(0, steps).Select(_ => t.TrainStep().Loss).ToList();
            }
            finally
            {
                stop.Cancel();
                hammer.Wait();
            }
        }
        var calm = Run(pressure: false);
        var stressed = Run(pressure: true);
        Assert.Equal(calm, stressed);
    }
}
