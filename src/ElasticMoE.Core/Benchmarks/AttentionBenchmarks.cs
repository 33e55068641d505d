using ElasticMoE.Configuration;
using ElasticMoE.Data;

namespace ElasticMoE.Benchmarks;

/// <summary>
/// MLA against MHA at equal wall time (<c>bench --suite mla-race</c>): the configured model with each attention,
/// everything else equal, raced side by side as <see cref="MoEBenchmarks.Race(ElasticMoEConfig, ElasticMoEConfig, TextCorpus, double, TextWriter?, ValueTuple{string, string})"/>
/// races two models; what each reaches in the same training time, how fast it trains, and what its inference cache keeps.
/// </summary>
public static class AttentionBenchmarks
{
    /// <summary>The config with <paramref name="attention"/> in every block (MLA sized by <c>model.mla.*</c>).</summary>
    public static ElasticMoEConfig With(ElasticMoEConfig config, AttentionKind attention) => config with { Model = config.Model with { Attention = attention } };

    /// <param name="Curve">Its validation curve against its own training time.</param>
    /// <param name="TokensPerStep">Training tokens per step (the same for both: global batch × context).</param>
    /// <param name="AttentionParameters">Parameters of one block's attention.</param>
    /// <param name="StepSeconds">Every step's time, in order.</param>
    public sealed record Side(ModelOptions Model, IReadOnlyList<MoEBenchmarks.RacePoint> Curve, long TokensPerStep, long AttentionParameters, IReadOnlyList<double> StepSeconds)
    {
        /// <summary>Training tokens per second of the median step: on a shared machine a step now and then stalls behind
        /// another process, which moves the mean (and the steps reached in the race) but not the median.</summary>
        public double TokensPerSecond => TokensPerStep / MoEBenchmarks.Median(StepSeconds);

        /// <summary>Validation loss at <paramref name="step"/> (a step of the curve), or null.</summary>
        public double? LossAtStep(long step) => Curve.FirstOrDefault(p => p.Step == step)?.ValidationLoss;

        /// <summary>Elements its generation cache keeps per token and layer.</summary>
        public int KvElementsPerToken => Model.KvElementsPerToken;
    }

    public sealed record RaceResult(Side Mla, Side Mha)
    {
        /// <summary>The last step at which both were evaluated: there the losses compare per step, whatever the machine's speed did.</summary>
        public long? CommonStep => Mla.Curve.Select(p => p.Step).Intersect(Mha.Curve.Select(p => p.Step)).Cast<long?>().Max();
    }

    /// <summary>MLA and MHA, each <paramref name="seconds"/> of training time, side by side in blocks of <see cref="MoEBenchmarks.RaceBlock"/> steps.</summary>
    public static RaceResult Race(ElasticMoEConfig config, TextCorpus corpus, double seconds, TextWriter? log = null)
    {
        var (mla, mha) = (With(config, AttentionKind.Mla), With(config, AttentionKind.Mha));
        var race = MoEBenchmarks.Race(mla, mha, corpus, seconds, log, ("MLA", "MHA"));
        long tokensPerStep = (long)config.Train.GlobalBatch * config.Model.Context;
        return new RaceResult(
            new Side(mla.Model, race.First, tokensPerStep, AttentionParameters(mla.Model), race.FirstStepSeconds),
            new Side(mha.Model, race.Second, tokensPerStep, AttentionParameters(mha.Model), race.SecondStepSeconds));
    }

    /// <summary>Weights of one block's attention: MHA's [q; k; v] and output projections, or MLA's query, latent, up- and output projections (norms included).</summary>
    public static long AttentionParameters(ModelOptions m)
    {
        long d = m.DModel, h = m.Heads;
        if (m.Attention == AttentionKind.Mha) return 4 * d * d;
        long qk = m.QkNopeHeadDim + m.QkRopeHeadDim;
        long query = m.QLoraRank > 0 ? d * m.QLoraRank + m.QLoraRank + m.QLoraRank * h * qk : d * h * qk;
        return query + d * (m.KvLoraRank + m.QkRopeHeadDim) + m.KvLoraRank + m.KvLoraRank * h * (m.QkNopeHeadDim + m.VHeadDim) + h * m.VHeadDim * d;
    }
}
