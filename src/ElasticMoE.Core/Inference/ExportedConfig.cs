using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using ElasticMoE.Checkpointing;
using ElasticMoE.Configuration;
using ElasticMoE.Data;
using ElasticMoE.State;

namespace ElasticMoE.Inference;

/// <summary>
/// The <c>config.json</c> written beside an exported model: what another tool needs to run the safetensors file
/// without our code — the architecture in words and numbers, the tokenizer, every tensor's name, dtype and shape.
/// </summary>
/// <remarks>
/// Why a file of its own, when the safetensors metadata already holds the run fingerprint: that string is ours (its
/// keys are our record fields) and says nothing of how the tensors combine. Named <c>config.json</c> beside the
/// weights, as other model files are laid out, so a directory with both is a model; a <c>config.json</c> there that
/// is not one of ours is never overwritten.
/// </remarks>
public static class ExportedConfig
{
    public const string FileName = "config.json";

    /// <summary>Where the config of the model file <paramref name="modelPath"/> goes.</summary>
    public static string PathFor(string modelPath) => Path.Combine(Path.GetDirectoryName(Path.GetFullPath(modelPath))!, FileName);

    /// <summary>The config's path for <paramref name="modelPath"/>, checked before anything is exported there.</summary>
    /// <exception cref="InvalidDataException">A <c>config.json</c> that is not an ElasticMoE model's is in the way.</exception>
    public static string EnsureWritable(string modelPath)
    {
        var path = PathFor(modelPath);
        if (!File.Exists(path)) return path;
        string? format = null;
        try { format = JsonNode.Parse(File.ReadAllText(path))?["format"]?.GetValue<string>(); }
        catch (Exception e) when (e is JsonException or InvalidOperationException) { }
        return format == VerifiedCheckpoint.ModelFormat ? path
            : throw new InvalidDataException($"{path} exists and is not the config of an ElasticMoE model: not overwritten (export into another directory)");
    }

    /// <summary>Writes the config of the exported model <paramref name="modelPath"/> (atomically); returns its path.</summary>
    /// <exception cref="InvalidDataException">A <c>config.json</c> that is not an ElasticMoE model's is in the way.</exception>
    public static string Write(string modelPath)
    {
        var file = Safetensors.Read(File.ReadAllBytes(modelPath));
        var run = RunSettings.Parse(file.Metadata["run_fingerprint"]);
        var path = EnsureWritable(modelPath);
        var json = Build(run, file, Path.GetFileName(modelPath)).ToJsonString(new JsonSerializerOptions { WriteIndented = true });
        DurableFile.Write(path, s => s.Write(System.Text.Encoding.UTF8.GetBytes(json + "\n")));
        return path;
    }

    /// <summary>The config as JSON.</summary>
    public static JsonObject Build(RunSettings run, SafetensorsFile file, string weightsFile)
    {
        var m = run.Model;
        var e = m.MoE;
        var tensors = new JsonObject();
        foreach (var t in file.Entries.OrderBy(t => t.Name, StringComparer.Ordinal))
            tensors[t.Name] = new JsonObject { ["dtype"] = t.DType, ["shape"] = new JsonArray(t.Shape.Select(s => (JsonNode)s).ToArray()) };
        var config = new JsonObject
        {
            ["format"] = VerifiedCheckpoint.ModelFormat,
            ["architecture"] = "MoETransformer",
            ["description"] = "DeepSeek-style Mixture-of-Experts decoder: pre-norm blocks of RoPE causal self-attention and a SwiGLU FFN " +
                              "(dense in the first dense_layers blocks, else shared plus top-k routed experts), RMSNorm, untied head",
            ["weights"] = weightsFile,
            ["step"] = long.Parse(file.Metadata.GetValueOrDefault("step") ?? "0", CultureInfo.InvariantCulture),
            ["tokenizer"] = Tokenizers.NameOf(m),
            ["vocab_size"] = m.VocabSize,
            ["d_model"] = m.DModel,
            ["layers"] = m.Layers,
            ["heads"] = m.Heads,
            ["head_dim"] = m.HeadDim,
            ["attention"] = m.Attention.ToString().ToLowerInvariant(),
            ["context"] = m.Context,
            ["rope_theta"] = m.RopeTheta,
            ["norm_eps"] = m.NormEps,
            ["dense_layers"] = m.DenseLayers,
            ["dense_hidden"] = m.DenseHidden,
            ["layer_types"] = new JsonArray(Enumerable.Range(0, m.Layers).Select(i => (JsonNode)(m.IsMoELayer(i) ? "moe" : "dense")).ToArray()),
            ["moe"] = new JsonObject
            {
                ["shared_experts"] = e.SharedExperts,
                ["shared_hidden"] = e.SharedExperts * e.ExpertHidden,
                ["routed_experts"] = e.RoutedExperts,
                ["top_k"] = e.TopK,
                ["expert_hidden"] = e.ExpertHidden,
                ["scoring"] = e.Scoring.ToString().ToLowerInvariant(),
                ["route_scale"] = e.RouteScale,
                ["capacity_factor"] = e.CapacityFactor,
            },
            // The maths, so that a reader can be written from this file alone (the tests' numpy reader is).
            ["forward"] = new JsonArray(
                "h = embed.weight[tokens]",
                "per block i: h = h + attn(attn_norm(h)); h = h + ffn(ffn_norm(h))",
                "logits = head.weight @ final_norm(h)",
                "rmsnorm(x) = x / sqrt(mean(x^2) + norm_eps) * weight",
                "attn: [q; k; v] = qkv.weight @ x, each split into heads of head_dim (q rows 0..d-1, k d..2d-1, v 2d..3d-1); " +
                "RoPE on q and k: inv_freq[j] = rope_theta^(-2j/head_dim), angle = position * inv_freq, cos/sin of [angle, angle], " +
                "x * cos + [-x2, x1] * sin with x1, x2 the halves of the head; softmax(q k^T / sqrt(head_dim)) causal; output proj.weight @ heads",
                "attn when attention is mla (DeepSeek-V3 MLA, head_dim unused): q = wq.weight @ x, or wq_b.weight @ rmsnorm_q_norm(wq_a.weight @ x) " +
                "when q_lora_rank > 0, per head [q_nope (qk_nope_head_dim); q_pe (qk_rope_head_dim)]; [c; k_pe] = wkv_a.weight @ x, c = rmsnorm_kv_norm(c) " +
                "(kv_lora_rank); per head [k_nope; v] = rows of wkv_b.weight @ c (qk_nope_head_dim then v_head_dim per head); RoPE (over qk_rope_head_dim) " +
                "on q_pe and on k_pe, one k_pe shared by all heads; softmax([q_nope; q_pe] [k_nope; k_pe]^T / sqrt(qk_nope_head_dim + qk_rope_head_dim)) " +
                "causal; output proj.weight @ heads of v",
                "swiglu(x) = w2.weight @ (silu(w1.weight @ x) * (w3.weight @ x))",
                "dense ffn: swiglu with blocks.i.ffn.{w1,w2,w3}",
                "moe ffn: s = sigmoid(router.gate.weight @ x) (softmax if scoring is softmax); chosen = top_k of s + router.expert_bias; " +
                "g = s[chosen] (divided by their sum under sigmoid) * route_scale; y = sum over chosen e of g_e * swiglu_e(x) (blocks.i.ffn.experts.e) + swiglu_shared(x) (blocks.i.ffn.shared)"),
            ["tensors"] = tensors,
        };
        // Only an MLA model has the section: an MHA model's config.json is the one of before MLA but for "attention".
        if (m.Attention == AttentionKind.Mla)
            config["mla"] = new JsonObject
            {
                ["q_lora_rank"] = m.QLoraRank,
                ["kv_lora_rank"] = m.KvLoraRank,
                ["qk_nope_head_dim"] = m.QkNopeHeadDim,
                ["qk_rope_head_dim"] = m.QkRopeHeadDim,
                ["v_head_dim"] = m.VHeadDim,
            };
        return config;
    }
}
