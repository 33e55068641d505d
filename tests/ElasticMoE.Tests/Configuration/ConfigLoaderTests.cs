using ElasticMoE.Configuration;

namespace ElasticMoE.Tests.Configuration;

public class ConfigLoaderTests
{
    private static string Write(string text)
    {
        var path = Path.Combine(TestSupport.TempDir(), "user.conf");
        File.WriteAllText(path, text);
        return path;
    }

    [Fact]
    public void Defaults_load_from_the_reference()
    {
        var c = ConfigLoader.Load();
        Assert.Equal(256, c.Model.VocabSize);
        Assert.Equal(RouterScoring.Sigmoid, c.Model.MoE.Scoring);
        Assert.Equal(0.001, c.Model.MoE.BiasUpdateRate);
        Assert.Equal("", c.Data.Path);
    }

    [Fact]
    public void A_user_file_overrides_and_the_command_line_overrides_the_file()
    {
        var path = Write("elasticmoe { train { steps = 7, lr = 0.01 } model.moe.top-k = 3 }");
        var c = ConfigLoader.Load(path, [new("train.steps", "9")]);
        Assert.Equal(9, c.Train.Steps);
        Assert.Equal(0.01, c.Train.Lr);
        Assert.Equal(3, c.Model.MoE.TopK);
    }

    [Fact]
    public void An_unknown_key_names_the_key_and_the_file()
    {
        var path = Write("elasticmoe.train.setps = 7");
        var ex = Assert.Throws<ConfigException>(() => ConfigLoader.Load(path));
        Assert.Contains("elasticmoe.train.setps", ex.Message);
        Assert.Contains(path, ex.Message);
        Assert.Contains("did you mean 'elasticmoe.train.steps'", ex.Message);
    }

    [Fact]
    public void An_unknown_override_key_is_refused()
    {
        var ex = Assert.Throws<ConfigException>(() => ConfigLoader.Load(null, [new("model.moe.topk", "2")]));
        Assert.Contains("elasticmoe.model.moe.topk", ex.Message);
    }

    [Fact]
    public void A_mistyped_value_names_its_key()
    {
        var path = Write("elasticmoe.train.steps = lots");
        var ex = Assert.Throws<ConfigException>(() => ConfigLoader.Load(path));
        Assert.Contains("elasticmoe.train.steps", ex.Message);
        Assert.Contains("integer", ex.Message);
    }

    [Fact]
    public void Inconsistent_values_name_their_key()
    {
        var ex = Assert.Throws<ConfigException>(() => ConfigLoader.Load(null, [new("train.global-batch", "10"), new("train.micro-batch", "4")]));
        Assert.Contains("train.global-batch", ex.Message);
        ex = Assert.Throws<ConfigException>(() => ConfigLoader.Load(null, [new("model.moe.top-k", "20")]));
        Assert.Contains("model.moe.top-k", ex.Message);
        ex = Assert.Throws<ConfigException>(() => ConfigLoader.Load(null, [new("model.moe.scoring", "relu")]));
        Assert.Contains("scoring", ex.Message);
    }

    [Fact]
    public void A_missing_config_file_is_a_clear_error()
    {
        var ex = Assert.Throws<ConfigException>(() => ConfigLoader.Load("/nonexistent/x.conf"));
        Assert.Contains("/nonexistent/x.conf", ex.Message);
    }

    [Fact]
    public void Broken_hocon_is_reported_with_the_file()
    {
        var path = Write("elasticmoe { train { steps = ");
        var ex = Assert.Throws<ConfigException>(() => ConfigLoader.Load(path));
        Assert.Contains(path, ex.Message);
    }

    private static ElasticMoEConfig With(params (string Key, string Value)[] overrides) =>
        ConfigLoader.Load(null, overrides.Select(o => KeyValuePair.Create(o.Key, o.Value)));

    [Theory]
    // Frame version 2's tags: 12 bits for the micro-batch (or validation batch) and each worker index, 10 for the
    // layer or stage. global-batch / micro-batch is the micro-batch count (micro-batch is 8 by default).
    [InlineData("train.global-batch", "32776", "", "", "elasticmoe.train.global-batch", "4097 micro-batches", "4096")]
    [InlineData("train.global-batch", "4097", "train.micro-batch", "1", "elasticmoe.train.global-batch", "4097 micro-batches", "4096")]
    [InlineData("train.eval-batches", "4097", "", "", "elasticmoe.train.eval-batches", "is 4097", "4096")]
    [InlineData("model.layers", "1025", "", "", "elasticmoe.model.layers", "is 1025", "1024")]
    [InlineData("cluster.nodes", "4097", "", "", "elasticmoe.cluster.nodes", "4097 workers", "4096")]
    [InlineData("cluster.nodes", "2049", "cluster.devices", "2", "elasticmoe.cluster.nodes", "4098 workers", "4096")]
    [InlineData("cluster.expected-nodes", "4097", "", "", "elasticmoe.cluster.expected-nodes", "4097 workers", "4096")]
    [InlineData("cluster.expected-nodes", "1025", "cluster.devices", "4", "elasticmoe.cluster.expected-nodes", "4100 workers", "4096")]
    public void Values_that_data_plane_tags_cannot_carry_are_refused_naming_the_key_and_the_limit(
        string key, string value, string otherKey, string otherValue, string expectedKey, string expectedCount, string limit)
    {
        var overrides = new List<(string, string)> { (key, value) };
        if (otherKey != "") overrides.Add((otherKey, otherValue));
        var ex = Assert.Throws<ConfigException>(() => With(overrides.ToArray()));
        Assert.StartsWith(expectedKey + ":", ex.Message);
        Assert.Contains(expectedCount, ex.Message);
        Assert.Contains("at most " + limit, ex.Message);
    }

    [Theory]
    // Each limit on its own, exactly at it: 4,096 micro-batches, validation batches and workers, 1,024 layers.
    [InlineData("train.global-batch", "32768", "", "")]
    [InlineData("train.global-batch", "4096", "train.micro-batch", "1")]
    [InlineData("train.eval-batches", "4096", "", "")]
    [InlineData("model.layers", "1024", "", "")]
    [InlineData("cluster.nodes", "4096", "", "")]
    [InlineData("cluster.nodes", "2048", "cluster.devices", "2")]
    [InlineData("cluster.expected-nodes", "4096", "", "")]
    [InlineData("cluster.expected-nodes", "1024", "cluster.devices", "4")]
    public void Values_at_each_tag_limit_are_accepted(string key, string value, string otherKey, string otherValue)
    {
        var overrides = new List<(string, string)> { (key, value) };
        if (otherKey != "") overrides.Add((otherKey, otherValue));
        With(overrides.ToArray());
    }

    [Fact]
    public void Values_at_the_tag_limits_are_accepted_together()
    {
        var c = With(("train.global-batch", "32768"), ("train.eval-batches", "4096"), ("model.layers", "1024"),
            ("cluster.nodes", "2048"), ("cluster.devices", "2"), ("cluster.expected-nodes", "1024"));
        Assert.Equal(4096, c.Train.MicroBatchesPerStep);
        Assert.Equal(4096, c.Cluster.Nodes * c.Cluster.Devices);
        Assert.Equal(1024, c.Model.Layers);
    }

    [Fact]
    public void The_config_limits_are_the_ones_the_tags_carry()
    {
        // Two assemblies state them (Core cannot see the Runtime's tag layout): they must agree, or a run the config
        // accepts would wrap an index in its tags and silently take the wrong micro-batch's frames.
        Assert.Equal(ElasticMoE.Runtime.Engine.StepTags.MaxWorkers, ElasticMoEConfig.MaxWorkers);
        Assert.Equal(ElasticMoE.Runtime.Engine.StepTags.MaxWorkers, ElasticMoE.Planning.ElasticPlanner.MaxWorkers);
        Assert.Equal(ElasticMoE.Runtime.Engine.StepTags.MaxMicroBatches, ElasticMoEConfig.MaxMicroBatchesPerStep);
        Assert.Equal(ElasticMoE.Runtime.Engine.StepTags.MaxMicroBatches, ElasticMoEConfig.MaxEvalBatches);
        Assert.Equal(ElasticMoE.Runtime.Engine.StepTags.MaxLayers, ElasticMoEConfig.MaxLayers);
        Assert.Equal(ElasticMoE.Runtime.DataPlane.CollectiveTags.MaxLayers, ElasticMoEConfig.MaxLayers);
        Assert.Equal((4096, 4096, 1024), (ElasticMoEConfig.MaxWorkers, ElasticMoEConfig.MaxMicroBatchesPerStep, ElasticMoEConfig.MaxLayers));
    }

    [Fact]
    public void Tag_limits_in_a_user_file_name_the_file_too()
    {
        var path = Write("elasticmoe.cluster { nodes = 3, devices = 1366 }");
        var ex = Assert.Throws<ConfigException>(() => ConfigLoader.Load(path));
        Assert.Contains(path, ex.Message);
        Assert.Contains("elasticmoe.cluster.nodes", ex.Message);
        Assert.Contains("4098 workers", ex.Message);
    }

    [Fact]
    public void Cluster_timeouts_relayout_and_fault_injection_have_defaults_and_can_be_set()
    {
        var d = ConfigLoader.Load().Cluster;
        Assert.Equal(60, d.PlanTimeoutSeconds);
        Assert.Equal(120, d.EvalTimeoutSeconds);
        Assert.Equal(30, d.FinishTimeoutSeconds);
        Assert.Equal("", d.Relayout);
        Assert.Equal("", d.FaultInjection);

        var c = With(("cluster.plan-timeout", "5.5"), ("cluster.eval-timeout", "7"), ("cluster.finish-timeout", "1"),
            ("cluster.relayout", "10=4x2,20=4x4"), ("cluster.fault-injection", "step=5,phase=backward,attempt=0")).Cluster;
        Assert.Equal(5.5, c.PlanTimeoutSeconds);
        Assert.Equal(7, c.EvalTimeoutSeconds);
        Assert.Equal(1, c.FinishTimeoutSeconds);
        Assert.Equal("10=4x2,20=4x4", c.Relayout);
        Assert.Equal("step=5,phase=backward,attempt=0", c.FaultInjection);

        var path = Write("elasticmoe.cluster { relayout = \"10=4x2\", fault-injection = \"step=1,phase=forward,attempt=1\" }");
        var f = ConfigLoader.Load(path).Cluster;
        Assert.Equal("10=4x2", f.Relayout);
        Assert.Equal("step=1,phase=forward,attempt=1", f.FaultInjection);
    }

    [Theory]
    [InlineData("cluster.plan-timeout", "0")]
    [InlineData("cluster.eval-timeout", "-1")]
    [InlineData("cluster.finish-timeout", "0")]
    public void Cluster_timeouts_must_be_positive(string key, string value)
    {
        var ex = Assert.Throws<ConfigException>(() => With((key, value)));
        Assert.StartsWith($"elasticmoe.{key}:", ex.Message);
        Assert.Contains("positive", ex.Message);
    }

    [Fact]
    public void The_leave_settle_window_is_read_and_must_not_be_negative()
    {
        Assert.Equal(0.25, With().Cluster.LeaveSettleSeconds);
        Assert.Equal(1.5, With(("cluster.leave-settle", "1.5")).Cluster.LeaveSettleSeconds);
        var ex = Assert.Throws<ConfigException>(() => With(("cluster.leave-settle", "-1")));
        Assert.StartsWith("elasticmoe.cluster.leave-settle:", ex.Message);
        Assert.Contains("zero or positive", ex.Message);
    }

    [Fact]
    public void Failure_detection_settings_are_read_and_defaults_suit_a_LAN()
    {
        var d = With().FailureDetection;
        Assert.Equal(FailureDetectionOptions.Default, d);
        var f = With(("cluster.failure-detection.acceptable-pause", "5"), ("cluster.failure-detection.probe-timeout", "2"),
            ("cluster.failure-detection.step-overdue", "0")).FailureDetection;
        Assert.Equal((5.0, 2.0, 0.0), (f.AcceptablePause, f.ProbeTimeout, f.StepOverdue));
    }

    [Theory]
    [InlineData("cluster.failure-detection.heartbeat-interval", "0", "more than 0")]
    [InlineData("cluster.failure-detection.acceptable-pause", "0.4", "twice the heartbeat interval")]
    [InlineData("cluster.failure-detection.probe-timeout", "-1", "more than 0")]
    [InlineData("cluster.failure-detection.probe-interval", "61", "at most 60")]
    [InlineData("cluster.failure-detection.step-overdue", "1.2", "at least 1.5")]
    public void Failure_detection_settings_out_of_range_are_refused_with_the_reason(string key, string value, string reason)
    {
        var ex = Assert.Throws<ConfigException>(() => With((key, value)));
        Assert.StartsWith($"elasticmoe.{key}:", ex.Message);
        Assert.Contains(reason, ex.Message);
    }

    [Fact]
    public void Attention_defaults_to_MHA_and_MLA_reads_every_size()
    {
        var d = With().Model;
        Assert.Equal(AttentionKind.Mha, d.Attention);
        Assert.Equal(2 * d.Heads * d.HeadDim, d.KvElementsPerToken);
        var m = With(("model.attention", "mla"), ("model.mla.q-lora-rank", "48"), ("model.mla.kv-lora-rank", "40"),
            ("model.mla.qk-nope-head-dim", "24"), ("model.mla.qk-rope-head-dim", "8"), ("model.mla.v-head-dim", "20"), ("model.heads", "3")).Model;
        Assert.Equal((AttentionKind.Mla, 48, 40, 24, 8, 20), (m.Attention, m.QLoraRank, m.KvLoraRank, m.QkNopeHeadDim, m.QkRopeHeadDim, m.VHeadDim));
        Assert.Equal(40 + 8, m.KvElementsPerToken);
        Assert.Equal(8, m.RopeDim);
    }

    [Theory]
    [InlineData("model.attention", "gqa", "model.attention", "\"mha\" (multi-head) or \"mla\"")]
    [InlineData("model.mla.q-lora-rank", "-1", "elasticmoe.model.mla.q-lora-rank:", "zero (no query compression) or positive")]
    [InlineData("model.mla.kv-lora-rank", "0", "elasticmoe.model.mla.kv-lora-rank:", "positive")]
    [InlineData("model.mla.qk-nope-head-dim", "0", "elasticmoe.model.mla.qk-nope-head-dim:", "positive")]
    [InlineData("model.mla.qk-rope-head-dim", "7", "elasticmoe.model.mla.qk-rope-head-dim:", "even for RoPE, got 7")]
    [InlineData("model.mla.qk-rope-head-dim", "0", "elasticmoe.model.mla.qk-rope-head-dim:", "positive")]
    [InlineData("model.mla.v-head-dim", "-4", "elasticmoe.model.mla.v-head-dim:", "positive")]
    [InlineData("model.mla.v-head-dim", "four", "elasticmoe.model.mla.v-head-dim", "integer")]
    public void Bad_MLA_settings_are_refused_naming_the_key(string key, string value, string where, string reason)
    {
        var ex = Assert.Throws<ConfigException>(() => With(("model.attention", "mla"), (key, value)));
        Assert.Contains(where, ex.Message);
        Assert.Contains(reason, ex.Message);
    }

    [Fact]
    public void MLA_sizes_are_checked_only_for_MLA_and_MLA_heads_need_not_divide_d_model()
    {
        // A broken MLA size does not stop an MHA run (the section is ignored), ...
        Assert.Equal(AttentionKind.Mha, With(("model.mla.qk-rope-head-dim", "7")).Model.Attention);
        // ... and MLA's heads have widths of their own, where MHA's must divide d-model.
        Assert.Contains("must divide d-model", Assert.Throws<ConfigException>(() => With(("model.heads", "3"))).Message);
        Assert.Equal(3, With(("model.attention", "mla"), ("model.heads", "3")).Model.Heads);
    }

    [Fact]
    public void Redundancy_and_failure_domain_are_read_with_their_defaults()
    {
        var d = With().Cluster;
        Assert.Equal(1, d.Redundancy);
        Assert.Null(d.FailureDomain);   // the node is a domain of its own
        var c = With(("cluster.redundancy", "3"), ("cluster.failure-domain", "rack-2")).Cluster;
        Assert.Equal(3, c.Redundancy);
        Assert.Equal("rack-2", c.FailureDomain);
        Assert.Equal(0, With(("cluster.redundancy", "0")).Cluster.Redundancy);
        Assert.Null(With(("cluster.failure-domain", "")).Cluster.FailureDomain);
    }

    [Theory]
    [InlineData("cluster.redundancy", "-1", "must be 0 (no mirrors) or a positive number")]
    [InlineData("cluster.failure-domain", "rack\u00071", "without leading, trailing or control characters")]
    public void Redundancy_and_failure_domain_out_of_range_are_refused_with_the_reason(string key, string value, string reason)
    {
        var ex = Assert.Throws<ConfigException>(() => With((key, value)));
        Assert.StartsWith($"elasticmoe.{key}:", ex.Message);
        Assert.Contains(reason, ex.Message);
    }
}
