using ElasticMoE.Checkpointing;
using ElasticMoE.Data;
using ElasticMoE.Training;
using static TorchSharp.torch;

namespace ElasticMoE.Tests.Checkpointing;

/// <summary>Small trained models, their checkpoints and byte-level views of their state, shared by the checkpoint tests.</summary>
internal static class CheckpointKit
{
    public static Trainer NewTrainer()
    {
        var cfg = TestSupport.SmallConfig();
        return new Trainer(cfg, TextCorpus.Default(cfg.Data.ValidationFraction, cfg.Model.Context));
    }

    /// <summary>A trainer after <paramref name="steps"/> steps.</summary>
    public static Trainer Trained(int steps)
    {
        var t = NewTrainer();
        for (int i = 0; i < steps; i++) t.TrainStep();
        return t;
    }

    public static byte[] Bytes(Tensor t)
    {
        using var scope = NewDisposeScope();
        return t.detach().cpu().contiguous().bytes.ToArray();
    }

    /// <summary>Every value of the training state, by name: parameters, router biases, moments, step.</summary>
    public static SortedDictionary<string, byte[]> TrainingSnapshot(Trainer t)
    {
        var state = new SortedDictionary<string, byte[]>(StringComparer.Ordinal);
        foreach (var (name, value) in t.Model.state_dict()) state["model/" + name] = Bytes(value);
        foreach (var (name, (m, v)) in t.Optimizer.Moments)
        {
            state["m/" + name] = Bytes(m);
            state["v/" + name] = Bytes(v);
        }
        state["step"] = BitConverter.GetBytes(t.Step);
        state["adam.step"] = BitConverter.GetBytes(t.Optimizer.StepCount);
        return state;
    }

    /// <summary>A run directory with committed checkpoints of a small model after each of <paramref name="steps"/>; the states saved, by step.</summary>
    public static (string RunDir, Dictionary<long, SortedDictionary<string, byte[]>> States) RunWithCheckpoints(params int[] steps)
    {
        var dir = Path.Combine(TestSupport.TempDir(), "run");
        var states = new Dictionary<long, SortedDictionary<string, byte[]>>();
        using var t = NewTrainer();
        foreach (var step in steps)
        {
            while (t.Step < step) t.TrainStep();
            t.Save(dir, keep: steps.Length);
            states[step] = TrainingSnapshot(t);
        }
        return (dir, states);
    }

    public static void CopyDirectory(string from, string to)
    {
        Directory.CreateDirectory(to);
        foreach (var file in Directory.GetFiles(from)) File.Copy(file, Path.Combine(to, Path.GetFileName(file)));
        foreach (var sub in Directory.GetDirectories(from)) CopyDirectory(sub, Path.Combine(to, Path.GetFileName(sub)));
    }
}
