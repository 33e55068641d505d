using System.Reflection;
using ElasticMoE.Configuration;
using ElasticMoE.Data;
using ElasticMoE.Training;

namespace ElasticMoE.Tests.Training;

public class RunFingerprintTests
{
    private static readonly ElasticMoEConfig Config = ConfigLoader.Load();

    private static string Run(ElasticMoEConfig config, string data = "d0") => TrainingState.RunFingerprint(config, data);

    // A copy of a positional record with one constructor argument changed to another valid-looking value.
    private static T With<T>(T record, ParameterInfo changed)
    {
        var ctor = typeof(T).GetConstructors().Single(c => !(c.GetParameters() is [var only] && only.ParameterType == typeof(T)));
        var args = ctor.GetParameters().Select(p =>
        {
            var value = typeof(T).GetProperty(p.Name!)!.GetValue(record);
            if (p.Name != changed.Name) return value;
            return value switch
            {
                int i => i + 1,
                long l => l + 1,
                double d => d == 0 ? 0.25 : d * 1.5,
                bool b => !b,
                string s => s == "bytes" ? "gpt2" : "bytes",
                RouterScoring s => s == RouterScoring.Sigmoid ? RouterScoring.Softmax : RouterScoring.Sigmoid,
                AttentionKind a => a == AttentionKind.Mha ? AttentionKind.Mla : AttentionKind.Mha,
                _ => throw new NotSupportedException($"{typeof(T).Name}.{p.Name} is {value?.GetType().Name}: teach this test to vary it"),
            };
        }).ToArray();
        return (T)ctor.Invoke(args);
    }

    private static IEnumerable<ParameterInfo> Fields<T>() =>
        typeof(T).GetConstructors().Single(c => !(c.GetParameters() is [var only] && only.ParameterType == typeof(T)))
            .GetParameters().Where(p => p.ParameterType != typeof(MoEOptions));

    [Fact]
    public void Every_train_option_a_node_computes_with_changes_the_run_fingerprint()
    {
        var baseline = Run(Config);
        var fields = Fields<TrainOptions>().ToList();
        Assert.True(fields.Count >= 14);
        foreach (var field in fields)
        {
            var changed = Run(Config with { Train = With(Config.Train, field) });
            if (TrainingState.CoordinatorOnly.Contains(field.Name!))
            {
                // Learning rate, clipping, schedule and stopping are the coordinator's: nodes may differ.
                Assert.Equal(baseline, changed);
                continue;
            }
            Assert.NotEqual(baseline, changed);
            Assert.Equal([$"train.{field.Name}"], TrainingState.RunFingerprintDifferences(baseline, changed).Select(d => d.Split(':')[0]));
        }
        Assert.Contains(nameof(TrainOptions.Steps), TrainingState.CoordinatorOnly);
    }

    [Fact]
    public void Every_model_and_moe_option_changes_the_run_fingerprint()
    {
        var baseline = Run(Config);
        foreach (var field in Fields<ModelOptions>())
            Assert.NotEqual(baseline, Run(Config with { Model = With(Config.Model, field) }));
        foreach (var field in Fields<MoEOptions>())
        {
            var changed = Run(Config with { Model = Config.Model with { MoE = With(Config.Model.MoE, field) } });
            Assert.Equal([$"model.MoE.{field.Name}"], TrainingState.RunFingerprintDifferences(baseline, changed).Select(d => d.Split(':')[0]));
        }
    }

    [Fact]
    public void The_model_fingerprint_of_MHA_is_the_one_of_before_MLA_and_MLA_sizes_change_it()
    {
        // Checkpoints written before MLA existed carry this string: they must still load.
        Assert.Equal("d128-L4-H4-T128-dense1x288-E8k2s1h96-Sigmoid", TrainingState.Fingerprint(Config.Model));
        var mla = Config.Model with { Attention = AttentionKind.Mla };
        Assert.NotEqual(TrainingState.Fingerprint(Config.Model), TrainingState.Fingerprint(mla));
        Assert.NotEqual(TrainingState.Fingerprint(mla), TrainingState.Fingerprint(mla with { KvLoraRank = 32 }));
        Assert.NotEqual(TrainingState.Fingerprint(mla), TrainingState.Fingerprint(mla with { QLoraRank = 32 }));
    }

    [Fact]
    public void The_seed_and_the_data_change_it_and_cluster_settings_do_not()
    {
        var baseline = Run(Config);
        Assert.Equal(baseline, Run(ConfigLoader.Load()));
        Assert.NotEqual(baseline, Run(Config with { Seed = Config.Seed + 1 }));
        Assert.NotEqual(baseline, Run(Config, "d1"));
        Assert.Equal(baseline, Run(Config with { Cluster = Config.Cluster with { Port = 4053, Devices = 2, Host = "10.0.0.2" }, Threads = 3 }));
    }

    [Fact]
    public void Differences_name_the_setting_and_both_values()
    {
        var a = Run(Config);
        var b = Run(ConfigLoader.Load(null, [new("train.global-batch", "32")]), "other");
        var differences = TrainingState.RunFingerprintDifferences(a, b);
        Assert.Equal(2, differences.Count);
        Assert.Contains("train.GlobalBatch: 16 vs 32", differences);
        Assert.Contains("data: d0 vs other", differences);
        Assert.Empty(TrainingState.RunFingerprintDifferences(a, a));
    }

    [Fact]
    public void Numbers_are_written_the_same_in_any_culture()
    {
        var before = System.Globalization.CultureInfo.CurrentCulture;
        try
        {
            System.Globalization.CultureInfo.CurrentCulture = new System.Globalization.CultureInfo("de-DE");
            var german = Run(Config);
            System.Globalization.CultureInfo.CurrentCulture = System.Globalization.CultureInfo.InvariantCulture;
            Assert.Equal(Run(Config), german);
            Assert.Contains("train.Beta2=0.95;", german);
        }
        finally
        {
            System.Globalization.CultureInfo.CurrentCulture = before;
        }
    }

    [Fact]
    public void The_model_fingerprint_is_unchanged()
    {
        Assert.Equal("d128-L4-H4-T128-dense1x288-E8k2s1h96-Sigmoid", TrainingState.Fingerprint(Config.Model));
    }

    [Fact]
    public void A_corpus_fingerprint_fits_in()
    {
        var corpus = TextCorpus.FromText("a", new string('x', 100) + new string('y', 100), 0.25, 8);
        Assert.EndsWith($";data={corpus.Fingerprint}", Run(Config, corpus.Fingerprint));
    }
}
