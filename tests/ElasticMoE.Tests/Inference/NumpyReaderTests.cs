using System.Text.Json;
using ElasticMoE.Data;
using ElasticMoE.Inference;
using ElasticMoE.Tests.Cli;
using ElasticMoE.Tests.State;
using ElasticMoE.Training;
using static TorchSharp.torch;

namespace ElasticMoE.Tests.Inference;

/// <summary>An exported model read and run by an independent reader: numpy, the safetensors layout and config.json, no code of ours.</summary>
public class NumpyReaderTests(Xunit.Abstractions.ITestOutputHelper output)
{
    [PythonNumpyFact]
    public void A_numpy_forward_pass_of_an_exported_model_gives_our_logits_within_1e_4()
    {
        // The bias update rate raised so the router biases are far from zero after a few steps: the reader must add them to choose.
        var config = TestSupport.SmallConfig(("train.steps", "6"), ("model.moe.bias-update-rate", "0.05"));
        var dir = TestSupport.TempDir();
        var run = Path.Combine(dir, "run");
        using (var trainer = new Trainer(config, TextCorpus.Default(config.Data.ValidationFraction, config.Model.Context)))
        {
            for (int i = 0; i < 6; i++) trainer.TrainStep();
            trainer.Save(run);
        }
        var model = Path.Combine(dir, "export", "model.safetensors");
        Directory.CreateDirectory(Path.GetDirectoryName(model)!);
        var (code, printed, err) = CliTests.Run(["checkpoints", "export", "--run-dir", run, "--out", model]);
        Assert.True(code == 0, err);
        Assert.Contains(ExportedConfig.FileName, printed);
        var tokens = ByteTokenizer.Instance.Encode("alice: hi bob!"); // within the context of 16
        var json = PythonNumpy.Run(Reader, Path.Combine(Path.GetDirectoryName(model)!, ExportedConfig.FileName), string.Join(',', tokens));
        var theirs = JsonSerializer.Deserialize<double[][]>(json)!;

        using var trained = TrainedModel.Open(model);
        using var _ = no_grad();
        using var x = tensor(tokens.Select(t => (long)t).ToArray(), [1, tokens.Length]);
        using var logits = trained.Model.forward(x);
        var ours = logits.select(0, 0).to(ScalarType.Float64).data<double>().ToArray();
        Assert.Equal(tokens.Length, theirs.Length);
        double worst = 0;
        for (int t = 0; t < tokens.Length; t++)
            for (int v = 0; v < config.Model.VocabSize; v++)
                worst = Math.Max(worst, Math.Abs(theirs[t][v] - ours[t * config.Model.VocabSize + v]));
        output.WriteLine($"numpy's logits differ from ours by up to {worst:E2}");
        Assert.True(worst <= 1e-4, $"numpy's logits differ from ours by up to {worst}");
        trained.Model.TakeExpertCounts();
    }

    [Fact]
    public void An_exported_MLA_model_says_so_in_its_config_and_loads_back_as_MLA()
    {
        var config = TestSupport.SmallConfig(("train.steps", "2"), ("model.attention", "mla"), ("model.mla.kv-lora-rank", "24"));
        var dir = TestSupport.TempDir();
        var tokens = ByteTokenizer.Instance.Encode("alice: hi bob!");
        using var x = tensor(tokens.Select(t => (long)t).ToArray(), [1, tokens.Length]);
        float[] expected;
        using (var trainer = new Trainer(config, TextCorpus.Default(config.Data.ValidationFraction, config.Model.Context)))
        {
            for (int i = 0; i < 2; i++) trainer.TrainStep();
            trainer.Save(Path.Combine(dir, "run"));
            using var _ = no_grad();
            trainer.Model.eval();
            using var logits = trainer.Model.forward(x);
            expected = logits.data<float>().ToArray();
            trainer.Model.TakeExpertCounts();
        }
        var model = Path.Combine(dir, "export", "model.safetensors");
        Directory.CreateDirectory(Path.GetDirectoryName(model)!);
        var (code, _, err) = CliTests.Run(["checkpoints", "export", "--run-dir", Path.Combine(dir, "run"), "--out", model]);
        Assert.True(code == 0, err);
        using var doc = JsonDocument.Parse(File.ReadAllText(ExportedConfig.PathFor(model)));
        Assert.Equal("mla", doc.RootElement.GetProperty("attention").GetString());
        Assert.Equal(24, doc.RootElement.GetProperty("mla").GetProperty("kv_lora_rank").GetInt32());
        Assert.Contains(doc.RootElement.GetProperty("tensors").EnumerateObject(), t => t.Name == "blocks.0.attn.wkv_b.weight");

        using var trained = TrainedModel.Open(model);
        Assert.Equal(config.Model, trained.Model.Options);
        using (no_grad())
        {
            using var logits = trained.Model.forward(x);
            Assert.Equal(expected, logits.data<float>().ToArray());
        }
        trained.Model.TakeExpertCounts();
    }

    [Fact]
    public void Export_never_overwrites_a_config_json_that_is_not_a_models()
    {
        var config = TestSupport.SmallConfig(("train.steps", "1"));
        var dir = TestSupport.TempDir();
        using (var trainer = new Trainer(config, TextCorpus.Default(config.Data.ValidationFraction, config.Model.Context)))
        {
            trainer.TrainStep();
            trainer.Save(Path.Combine(dir, "run"));
        }
        File.WriteAllText(Path.Combine(dir, "config.json"), "{\"mine\": true}");
        var (code, _, err) = CliTests.Run(["checkpoints", "export", "--run-dir", Path.Combine(dir, "run"), "--out", Path.Combine(dir, "m.safetensors")]);
        Assert.Equal(2, code);
        Assert.Contains("not overwritten", err);
        Assert.Equal("{\"mine\": true}", File.ReadAllText(Path.Combine(dir, "config.json")));
        Assert.False(File.Exists(Path.Combine(dir, "m.safetensors")));
    }

    /// <summary>
    /// The forward pass written from config.json's "forward" lines alone, in float64: json, struct and numpy only.
    /// Arguments: the config.json path and the tokens, comma-separated. Prints the logits [T][V] as JSON.
    /// </summary>
    private const string Reader = """
import json, struct, sys, os
import numpy as np
cfg = json.load(open(sys.argv[1]))
tokens = [int(t) for t in sys.argv[2].split(',')]
raw = open(os.path.join(os.path.dirname(sys.argv[1]), cfg['weights']), 'rb').read()
n = struct.unpack('<Q', raw[:8])[0]
header = json.loads(raw[8:8 + n])
W = {}
for name, e in header.items():
    if name == '__metadata__': continue
    assert e['dtype'] == 'F32' and cfg['tensors'][name]['shape'] == e['shape'], name
    b, end = e['data_offsets']
    W[name] = np.frombuffer(raw[8 + n + b:8 + n + end], dtype='<f4').reshape(e['shape']).astype(np.float64)
assert set(W) == set(cfg['tensors'])
d, H, hd, eps = cfg['d_model'], cfg['heads'], cfg['head_dim'], cfg['norm_eps']
T = len(tokens)

def rmsnorm(x, w): return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w
def silu(x): return x / (1 + np.exp(-x))
def swiglu(x, p): return (silu(x @ W[p + 'w1.weight'].T) * (x @ W[p + 'w3.weight'].T)) @ W[p + 'w2.weight'].T

inv = cfg['rope_theta'] ** (-2.0 * np.arange(hd // 2) / hd)
ang = np.outer(np.arange(T), inv)
cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
def rope(x):  # [H, T, hd]
    x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
    return x * cos + np.concatenate([-x2, x1], -1) * sin

def attn(x, p):
    qkv = x @ W[p + 'qkv.weight'].T
    q, k, v = (qkv[:, i * d:(i + 1) * d].reshape(T, H, hd).transpose(1, 0, 2) for i in range(3))
    q, k = rope(q), rope(k)
    s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + np.triu(np.full((T, T), -np.inf), 1)
    a = np.exp(s - s.max(-1, keepdims=True)); a /= a.sum(-1, keepdims=True)
    return (a @ v).transpose(1, 0, 2).reshape(T, d) @ W[p + 'proj.weight'].T

def moe(x, p):
    m = cfg['moe']
    logits = x @ W[p + 'router.gate.weight'].T
    s = 1 / (1 + np.exp(-logits)) if m['scoring'] == 'sigmoid' else np.exp(logits - logits.max(-1, keepdims=True))
    if m['scoring'] != 'sigmoid': s /= s.sum(-1, keepdims=True)
    biased = s + W[p + 'router.expert_bias']
    y = np.zeros_like(x)
    for t in range(T):
        chosen = sorted(range(m['routed_experts']), key=lambda e: (-biased[t, e], e))[:m['top_k']]
        g = s[t, chosen]
        if m['scoring'] == 'sigmoid': g = g / g.sum()
        g = g * m['route_scale']
        for e, ge in zip(chosen, g): y[t] += ge * swiglu(x[t:t + 1], p + 'experts.%d.' % e)[0]
    if m['shared_experts'] > 0: y += swiglu(x, p + 'shared.')
    return y

h = W['embed.weight'][tokens]
for i, kind in enumerate(cfg['layer_types']):
    p = 'blocks.%d.' % i
    h = h + attn(rmsnorm(h, W[p + 'attn_norm.weight']), p + 'attn.')
    f = rmsnorm(h, W[p + 'ffn_norm.weight'])
    h = h + (moe(f, p + 'ffn.') if kind == 'moe' else swiglu(f, p + 'ffn.'))
print(json.dumps((rmsnorm(h, W['final_norm.weight']) @ W['head.weight'].T).tolist()))
""";
}
