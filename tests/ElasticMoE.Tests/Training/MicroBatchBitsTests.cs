using ElasticMoE.Configuration;
using ElasticMoE.Data;
using ElasticMoE.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace ElasticMoE.Tests.Training;

/// <summary>
/// The canonical reduction fixes how micro-batches are summed; this checks the other half of bit-identity: one
/// micro-batch's gradients are the same bits whatever the thread count of the worker computing it, so nodes started
/// with different --threads agree.
/// </summary>
[Collection("cluster")]   // changes the process's libtorch thread count; kept apart from the cluster tests
public class MicroBatchBitsTests
{
    private static Dictionary<string, int[]> Gradients(ElasticMoEConfig cfg, int threads)
    {
        TestSupport.EnsureTorch();
        int before = torch.get_num_threads();
        torch.set_num_threads(threads);
        try
        {
            var corpus = TextCorpus.Default(cfg.Data.ValidationFraction, cfg.Model.Context);
            using var model = new MoETransformer(cfg.Model, cfg.Seed, CPU);
            var sampler = new BatchSampler(corpus, cfg.Seed, cfg.Model.Context);
            using var scope = NewDisposeScope();
            model.train();
            var (x, y) = sampler.TrainBatch(3, 0, cfg.Train.MicroBatch, CPU);
            var ce = MoETransformer.CrossEntropy(model.forward(x), y);
            (model.AuxLoss() is { } aux ? ce.Plus(aux) : ce).backward();
            model.TakeExpertCounts();
            return model.named_parameters().Where(p => p.parameter.grad is not null)
                .ToDictionary(p => p.name, p => p.parameter.grad!.data<float>().ToArray().Select(BitConverter.SingleToInt32Bits).ToArray());
        }
        finally
        {
            torch.set_num_threads(before);
        }
    }

    [Fact]
    public void A_micro_batchs_gradients_of_the_default_model_are_the_same_bits_on_one_thread_or_two()
    {
        var cfg = ConfigLoader.Load(null, new Dictionary<string, string>());
        var one = Gradients(cfg, 1);
        var two = Gradients(cfg, 2);
        Assert.Equal(one.Keys.Order(), two.Keys.Order());
        Assert.True(one.Count > 50, $"only {one.Count} parameters have gradients");
        foreach (var (name, bits) in one) Assert.True(bits.SequenceEqual(two[name]), $"{name} differs between 1 and 2 threads");
    }

    [Fact]
    public void A_router_whose_weight_gradient_MKL_would_split_over_threads_gives_the_same_bits_on_one_thread_or_two()
    {
        // 6 experts x 128 rows x d 128: without MKL's strict reproducibility mode (LibTorchLoader pins it), MKL summed the
        // router weight gradient's 128-long inner products in two halves on 2 threads: 141-160 of its 768 elements differed.
        var cfg = TestSupport.SmallConfig(("seed", "3"), ("model.d-model", "128"), ("model.heads", "4"), ("model.context", "64"),
            ("model.layers", "4"), ("model.dense-hidden", "288"), ("model.moe.routed-experts", "6"), ("model.moe.expert-hidden", "64"),
            ("train.micro-batch", "2"));
        var one = Gradients(cfg, 1);
        var two = Gradients(cfg, 2);
        Assert.Equal(ElasticMoE.Native.LibTorchLoader.DefaultMklCbwr, Environment.GetEnvironmentVariable("MKL_CBWR") ?? "");
        Assert.Contains("blocks.1.ffn.router.gate.weight", one.Keys);
        foreach (var (name, bits) in one)
        {
            int differ = bits.Zip(two[name]).Count(p => p.First != p.Second);
            Assert.True(differ == 0, $"{name}: {differ} of {bits.Length} elements differ between 1 and 2 threads");
        }
    }
}
