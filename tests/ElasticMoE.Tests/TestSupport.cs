using ElasticMoE.Configuration;
using ElasticMoE.Native;

namespace ElasticMoE.Tests;

/// <summary>Helpers shared by the tests: libtorch loaded once, small configs, temp folders.</summary>
public static class TestSupport
{
    static TestSupport() => LibTorchLoader.EnsureLoaded();

    public static void EnsureTorch() => LibTorchLoader.EnsureLoaded();

    /// <summary>The shared tiny-shakespeare file, found from the test's working folder upwards.</summary>
    public static string? SharedData(string name)
    {
        var dir = new DirectoryInfo(AppContext.BaseDirectory);
        while (dir is not null)
        {
            var p = Path.Combine(dir.FullName, "shared", "data", name);
            if (File.Exists(p)) return p;
            dir = dir.Parent;
        }
        return null;
    }

    /// <summary>A small model and batch so a step takes milliseconds; values in overrides win.</summary>
    public static ElasticMoEConfig SmallConfig(params (string Key, string Value)[] overrides)
    {
        EnsureTorch();
        return ConfigLoader.Load(null, SmallSettings(overrides));
    }

    /// <summary>The settings of <see cref="SmallConfig"/>, e.g. to pass the same run to a child process as --set arguments.</summary>
    public static Dictionary<string, string> SmallSettings(params (string Key, string Value)[] overrides)
    {
        var defaults = new Dictionary<string, string>
        {
            ["model.d-model"] = "32",
            ["model.layers"] = "3",
            ["model.heads"] = "2",
            ["model.context"] = "16",
            ["model.dense-layers"] = "1",
            ["model.dense-hidden"] = "48",
            ["model.moe.routed-experts"] = "4",
            ["model.moe.top-k"] = "2",
            ["model.moe.expert-hidden"] = "16",
            ["train.global-batch"] = "8",
            ["train.micro-batch"] = "2",
            ["train.steps"] = "20",
            ["train.warmup-steps"] = "2",
            ["train.eval-batches"] = "2",
            ["threads"] = "1",
        };
        foreach (var (k, v) in overrides) defaults[k] = v;
        return defaults;
    }

    /// <summary><see cref="SmallSettings"/> as command-line arguments: --set key=value for each.</summary>
    public static string[] SetArguments(Dictionary<string, string> settings)
        => settings.SelectMany(kv => new[] { "--set", $"{kv.Key}={kv.Value}" }).ToArray();

    public static string TempDir()
    {
        var d = Path.Combine(Path.GetTempPath(), "elasticmoe-tests", Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(d);
        return d;
    }
}
