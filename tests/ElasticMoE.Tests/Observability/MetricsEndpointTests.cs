using System.Globalization;
using System.Net;
using System.Net.Sockets;
using ElasticMoE.Configuration;
using ElasticMoE.Data;
using ElasticMoE.Runtime.DataPlane;
using ElasticMoE.Runtime.Observability;
using ElasticMoE.Tests.Cli;
using ElasticMoE.Tests.DataPlane;
using ElasticMoE.Training;
using ElasticMoE.Runtime.Hosting;

namespace ElasticMoE.Tests.Observability;

/// <summary>
/// The per-process Prometheus endpoint: a real HTTP endpoint scraped with <see cref="HttpClient"/> after a real
/// training run, the coordinator's hooks and real data-plane traffic.
/// </summary>
/// <remarks>
/// The metrics are process-wide, and counters only grow, so the tests compare counters before and after
/// what they do; gauges hold the last value set, which the test sets itself. Test collections do not run in
/// parallel here (xunit.runner.json), so nothing else trains meanwhile.
/// </remarks>
public class MetricsEndpointTests
{
    /// <summary>Prometheus text format: "name{labels} value" per line, comments skipped.</summary>
    private static Dictionary<string, double> Parse(string text) => text.Split('\n')
        .Where(l => l.Length > 0 && l[0] != '#')
        .ToDictionary(l => l[..l.LastIndexOf(' ')], l => double.Parse(l[(l.LastIndexOf(' ') + 1)..], NumberStyles.Float, CultureInfo.InvariantCulture));

    private static async Task<Dictionary<string, double>> Scrape(Uri url)
    {
        using var http = new HttpClient();
        using var response = await http.GetAsync(url);
        response.EnsureSuccessStatusCode();
        Assert.Equal("text/plain", response.Content.Headers.ContentType?.MediaType);
        return Parse(await response.Content.ReadAsStringAsync());
    }

    private static async Task<Dictionary<string, double>> Registry()
    {
        using var stream = new MemoryStream();
        await RunMetrics.Registry.CollectAndExportAsTextAsync(stream);
        return Parse(System.Text.Encoding.UTF8.GetString(stream.ToArray()));
    }

    /// <summary>Forwards to <see cref="RunMetrics.Observer"/> and keeps what it saw, to compare with the scrape.</summary>
    private sealed class Recorder : ITrainingObserver
    {
        public List<(StepResult Step, double? Val)> Steps { get; } = [];

        public void Step(StepResult step, double? valLoss)
        {
            Steps.Add((step, valLoss));
            RunMetrics.Observer.Step(step, valLoss);
        }

        public void MembershipEvent(string kind, string node, long step, double recoverySeconds) =>
            RunMetrics.Observer.MembershipEvent(kind, node, step, recoverySeconds);
    }

    [Fact]
    public async Task The_endpoint_serves_training_membership_plan_checkpoint_and_data_plane_metrics()
    {
        var port = LoopbackPorts.Next();
        using var endpoint = MetricsEndpoint.Start(new PrometheusOptions(port, "127.0.0.1"));
        Assert.NotNull(endpoint);
        Assert.Equal(new Uri($"http://127.0.0.1:{port}/metrics"), endpoint.Url);
        var before = await Scrape(endpoint.Url);

        // A real single-process run of 3 steps (validation at the last), its report feeding the metrics.
        var config = TestSupport.SmallConfig(("train.steps", "3"), ("train.eval-every", "10"));
        var recorder = new Recorder();
        using (var trainer = new Trainer(config, TextCorpus.Load(config.Data.Path, config.Data.ValidationFraction, config.Model.Context)))
            TrainingRun.Run(trainer, new RunOptions(Observer: recorder), TextWriter.Null);
        // What the coordinator reports and calls.
        using (var report = new TrainingReport(TextWriter.Null, null, RunMetrics.Observer))
            report.MembershipEvent("node-lost", "akka.tcp://elasticmoe@127.0.0.1:4001", 3, 1.5);
        RunMetrics.PlanInstalled(7, 0.25);
        RunMetrics.CheckpointStall(0.125);
        RunMetrics.CheckpointStall(0);
        // Real frames: 1000 bytes, and 250 floats sent as bfloat16 (500 bytes on the wire).
        long wire = 2 * FrameHeader.Size + 1000 + 500;
        await using (var cluster = new LoopbackCluster(2))
        {
            var (a, b) = (cluster.Nodes[0], cluster.Nodes[1]);
            await a.SendAsync(b.Endpoint, 1, new byte[1000]);
            await a.SendAsync(b.Endpoint, 2, new float[250], compression: Compression.BFloat16);
            (await b.ReceiveAsync(1).Within()).Dispose();
            (await b.ReceiveAsync(2).Within()).Dispose();
            Assert.Equal(wire, a.BytesSent);
            Assert.Equal(wire, b.BytesReceived);
            Assert.Equal(0, a.BytesReceived);
        }

        var after = await Scrape(endpoint.Url);
        double Delta(string name) => after[name] - before.GetValueOrDefault(name);

        Assert.Equal(3, recorder.Steps.Count);
        var (last, val) = recorder.Steps[^1];
        Assert.Equal(3, after["elasticmoe_step"]);
        Assert.Equal(last.Loss, after["elasticmoe_loss"], 1e-12);
        Assert.Equal(last.GradNorm, after["elasticmoe_grad_norm"], 1e-12);
        Assert.Equal(last.TokensPerSecond, after["elasticmoe_tokens_per_second"], 1e-9);
        Assert.NotNull(val);
        Assert.Equal(val.Value, after["elasticmoe_validation_loss"], 1e-12);
        Assert.Equal(3, Delta("elasticmoe_step_seconds_count"));
        Assert.Equal(recorder.Steps.Sum(s => s.Step.Seconds), Delta("elasticmoe_step_seconds_sum"), 1e-9);
        Assert.Equal(2, last.ExpertCounts.Length);   // SmallConfig: 3 layers, 1 dense
        for (int l = 0; l < last.ExpertCounts.Length; l++)
        for (int e = 0; e < last.ExpertCounts[l].Length; e++)
            Assert.Equal(last.ExpertCounts[l][e], after[$"elasticmoe_expert_load_tokens{{layer=\"{l}\",expert=\"{e}\"}}"]);

        Assert.Equal(1, Delta("elasticmoe_recoveries_total{kind=\"node-lost\"}"));
        Assert.Equal(1.5, Delta("elasticmoe_recovery_seconds_total{kind=\"node-lost\"}"), 1e-12);
        Assert.Equal(1, Delta("elasticmoe_replans_total"));
        Assert.Equal(0.25, Delta("elasticmoe_replan_seconds_total"), 1e-12);
        Assert.Equal(7, after["elasticmoe_plan_epoch"]);
        Assert.Equal(2, Delta("elasticmoe_checkpoints_total"));
        Assert.Equal(0.125, Delta("elasticmoe_checkpoint_stall_seconds_total"), 1e-12);
        // Process-wide: at least this test's frames (nothing else runs now, but the count is the whole process's).
        Assert.InRange(Delta("elasticmoe_dataplane_sent_bytes_total"), wire, double.MaxValue);
        Assert.InRange(Delta("elasticmoe_dataplane_received_bytes_total"), wire, double.MaxValue);
        Assert.True(after.ContainsKey("process_cpu_seconds_total"), "the process's own figures are served too");
    }

    [Fact]
    public async Task A_cluster_train_reports_its_steps_and_data_plane_bytes_and_then_releases_the_port()
    {
        var port = LoopbackPorts.Next();
        var before = await Registry();
        var (code, output, err) = CliTests.Run(["train", "--nodes", "2", "--steps", "2", "--set", $"metrics.prometheus.port={port}",
            .. TestSupport.SetArguments(TestSupport.SmallSettings())]);
        Assert.True(code == 0, err);
        Assert.Contains($"metrics endpoint http://127.0.0.1:{port}/metrics", output);
        // The endpoint is gone with the command: its port can be bound again.
        var probe = new TcpListener(IPAddress.Loopback, port);
        probe.Start();
        probe.Stop();
        // The metrics stay in the process: the coordinator's report fed them, two workers exchanged gradients.
        var after = await Registry();
        Assert.Equal(2, after["elasticmoe_step"]);
        Assert.Equal(2, after["elasticmoe_step_seconds_count"] - before.GetValueOrDefault("elasticmoe_step_seconds_count"));
        Assert.True(after["elasticmoe_dataplane_sent_bytes_total"] > before.GetValueOrDefault("elasticmoe_dataplane_sent_bytes_total"));
    }

    [Fact]
    public void Port_zero_starts_no_endpoint()
    {
        Assert.Null(MetricsEndpoint.Start(PrometheusOptions.Default));
        Assert.Equal(0, ConfigLoader.Load().Prometheus.Port);   // off unless configured
        Assert.Equal("127.0.0.1", ConfigLoader.Load().Prometheus.Host);
        var (code, output, err) = CliTests.Run(["train", "--single-process", "--steps", "1", .. TestSupport.SetArguments(TestSupport.SmallSettings())]);
        Assert.True(code == 0, err);
        Assert.DoesNotContain("metrics endpoint", output);
    }

    [Fact]
    public void A_port_in_use_is_a_config_error_naming_the_keys()
    {
        var taken = new TcpListener(IPAddress.Loopback, 0);
        taken.Start();
        try
        {
            int port = ((IPEndPoint)taken.LocalEndpoint).Port;
            var ex = Assert.Throws<ConfigException>(() => MetricsEndpoint.Start(new PrometheusOptions(port, "127.0.0.1")));
            Assert.Contains("metrics.prometheus.port", ex.Message);
            Assert.Contains($"127.0.0.1:{port}", ex.Message);
            var (code, _, err) = CliTests.Run(["train", "--single-process", "--steps", "1", "--set", $"metrics.prometheus.port={port}",
                .. TestSupport.SetArguments(TestSupport.SmallSettings())]);
            Assert.Equal(ElasticMoE.Cli.Program.ExitCodes.BadInput, code);
            Assert.Contains("cannot serve metrics", err);
        }
        finally
        {
            taken.Stop();
        }
    }

    [Theory]
    [InlineData("port", "70000", "elasticmoe.metrics.prometheus.port: must be a TCP port")]
    [InlineData("port", "-1", "elasticmoe.metrics.prometheus.port: must be a TCP port")]
    [InlineData("port", "nine", "config key 'elasticmoe.metrics.prometheus.port' must be an integer")]
    [InlineData("host", "not a host!", "elasticmoe.metrics.prometheus.host: must be a host name or IP address")]
    [InlineData("host", "", "elasticmoe.metrics.prometheus.host: must be a host name or IP address")]
    public void A_bad_port_or_host_is_a_config_error_naming_the_key(string key, string value, string message)
    {
        var ex = Assert.Throws<ConfigException>(() => ConfigLoader.Load(null, [new($"metrics.prometheus.{key}", value)]));
        Assert.Contains(message, ex.Message);
        var (code, _, err) = CliTests.Run("train", "--single-process", "--set", $"metrics.prometheus.{key}={value}");
        Assert.Equal(ElasticMoE.Cli.Program.ExitCodes.BadInput, code);
        Assert.Contains(message, err);
    }

    [Fact]
    public void Good_hosts_are_accepted()
    {
        foreach (var host in new[] { "127.0.0.1", "0.0.0.0", "::1", "localhost", "node-3.cluster.local" })
            Assert.Equal(host, ConfigLoader.Load(null, [new("metrics.prometheus.host", host)]).Prometheus.Host);
    }
}
