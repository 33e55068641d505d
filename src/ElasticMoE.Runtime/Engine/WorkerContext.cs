using ElasticMoE.Configuration;
using ElasticMoE.Data;
using ElasticMoE.Model;
using ElasticMoE.Planning;
using ElasticMoE.Runtime.DataPlane;
using ElasticMoE.Runtime.Protocol;
using static TorchSharp.torch;

namespace ElasticMoE.Runtime.Engine;

/// <summary>
/// Everything one device worker computes with: the config, its copy of the model, the data plane of
/// its node, and the current plan. Every worker builds the whole model from the seed, so any part of
/// it can be hosted anywhere with identical initial values; each actor then touches only its part.
/// </summary>
public sealed class WorkerContext : IDisposable
{
    public ElasticMoEConfig Config { get; }
    public MoETransformer Model { get; }
    public DataPlaneNode DataPlane { get; }
    public BatchSampler Sampler { get; }
    public Device Device { get; }
    public TrainingPlan Plan { get; private set; }
    public int Worker { get; private set; }

    /// <summary>Cancelled when the node stops: every wait on a peer gives up at once instead of at its timeout.</summary>
    public CancellationToken Stopping { get; }

    public WorkerContext(ElasticMoEConfig config, TextCorpus corpus, DataPlaneNode dataPlane, TrainingPlan plan, int worker,
        CancellationToken stopping = default)
    {
        Stopping = stopping;
        Config = config;
        Device = Training.TorchSetup.ResolveDevice(config);
        Model = new MoETransformer(config.Model, config.Seed, Device);
        DataPlane = dataPlane;
        Sampler = new BatchSampler(corpus, config.Seed, config.Model.Context);
        Plan = plan;
        Worker = worker;
    }

    public void Install(TrainingPlan plan, int worker)
    {
        Plan = plan;
        Worker = worker;
    }

    public int Stage => Plan.StageOf(Worker);
    public int Replica => Plan.ReplicaOf(Worker);
    public StageRange Blocks => Plan.Stages[Stage];
    public bool IsFirstStage => Stage == 0;
    public bool IsLastStage => Stage == Plan.Pp - 1;

    /// <summary>MoE layer ordinal (index among MoE layers) of block <paramref name="block"/>.</summary>
    public int MoEOrdinal(int block) => block - Config.Model.DenseLayers;

    public IEnumerable<MoELayer> StageMoELayers
        => Model.Blocks.Skip(Blocks.First).Take(Blocks.End - Blocks.First).Select(b => b.MoE).OfType<MoELayer>();

    /// <summary>
    /// The parameters this worker's pipeline stage owns and replicates across data-parallel ranks: its
    /// blocks minus routed experts, plus the embedding on the first stage and the head on the last.
    /// Names are those of the single-process model, so optimizer state lines up with it.
    /// </summary>
    public List<(string Name, Tensor Param)> DenseParameters()
    {
        var result = new List<(string, Tensor)>();
        foreach (var (name, p) in Model.named_parameters())
        {
            if (IsRoutedExpert(name)) continue;
            if (name.StartsWith("blocks.", StringComparison.Ordinal))
            {
                int block = int.Parse(name.Split('.')[1], System.Globalization.CultureInfo.InvariantCulture);
                if (!Blocks.Contains(block)) continue;
            }
            else if (name.StartsWith("embed.", StringComparison.Ordinal))
            {
                if (!IsFirstStage) continue;
            }
            else if (!IsLastStage) continue;   // final_norm, head
            result.Add((name, p));
        }
        return result;
    }

    /// <summary>Parameters of the routed experts of MoE layer <paramref name="moeOrdinal"/> hosted by this worker.</summary>
    public List<(string Name, Tensor Param)> ExpertParameters(int moeOrdinal)
    {
        var experts = Plan.ExpertsOn(moeOrdinal, Worker).ToHashSet();
        int block = moeOrdinal + Config.Model.DenseLayers;
        var prefix = $"blocks.{block}.ffn.experts.";
        var result = new List<(string, Tensor)>();
        foreach (var (name, p) in Model.named_parameters())
        {
            if (!name.StartsWith(prefix, StringComparison.Ordinal)) continue;
            int e = int.Parse(name[prefix.Length..].Split('.')[0], System.Globalization.CultureInfo.InvariantCulture);
            if (experts.Contains(e)) result.Add((name, p));
        }
        return result;
    }

    /// <summary>Sum and L2 norm of each parameter, for comparing runs laid out differently.</summary>
    public static ParameterSummary Summarize(int worker, IEnumerable<(string Name, Tensor Param)> parameters)
    {
        var list = parameters.ToList();
        using var scope = NewDisposeScope();
        return new ParameterSummary(worker, list.Select(p => p.Name).ToArray(),
            list.Select(p => p.Param.detach().to(ScalarType.Float64).sum().item<double>()).ToArray(),
            list.Select(p => p.Param.detach().to(ScalarType.Float64).norm().item<double>()).ToArray());
    }

    public static bool IsRoutedExpert(string name) => name.Contains(".ffn.experts.", StringComparison.Ordinal);

    public void Dispose() => Model.Dispose();
}
