using ElasticMoE.Runtime.DataPlane;

namespace ElasticMoE.Tests.DataPlane;

public sealed class DataPlaneBenchmarkTests
{
    // Throughput targets are checked with `elasticmoe bench` on an idle machine; a unit test on a shared
    // 2-core box can only check that the benchmark measures both paths and reports them coherently.
    [Fact]
    public async Task Reports_both_throughputs_and_their_ratio_per_size()
    {
        var results = await DataPlaneBenchmark.RunAsync([1, 2], repeats: 2).Within();
        Assert.Equal(new[] { 1, 2 }, results.Select(r => r.SizeMb));
        foreach (var r in results)
        {
            Assert.Equal(2, r.Repeats);
            Assert.True(r.DataPlaneMBps > 0 && double.IsFinite(r.DataPlaneMBps));
            Assert.True(r.RawSocketMBps > 0 && double.IsFinite(r.RawSocketMBps));
            Assert.Equal(r.DataPlaneMBps / r.RawSocketMBps, r.Ratio, 9);
            Assert.Contains("ratio", r.ToString());
        }
    }

    [Fact]
    public async Task Rejects_meaningless_arguments()
    {
        await Assert.ThrowsAsync<ArgumentOutOfRangeException>(() => DataPlaneBenchmark.RunAsync([1], 0));
        await Assert.ThrowsAsync<ArgumentOutOfRangeException>(() => DataPlaneBenchmark.RunAsync([0], 1));
    }
}
