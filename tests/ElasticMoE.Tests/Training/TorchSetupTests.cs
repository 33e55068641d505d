using ElasticMoE.Configuration;
using ElasticMoE.Training;
using TorchSharp;

namespace ElasticMoE.Tests.Training;

public class TorchSetupTests
{
    [Theory]
    [InlineData("cpu", 0, "cpu")]
    [InlineData("cpu", 5, "cpu")]
    [InlineData("cuda", 0, "cuda:0")]
    [InlineData("cuda", 3, "cuda:3")]
    [InlineData("cuda:0", 0, "cuda:0")]
    [InlineData("cuda:2", 0, "cuda:2")]
    [InlineData("cuda:2", 1, "cuda:3")]
    [InlineData("cuda:4", 3, "cuda:7")]
    public void Maps_the_configured_device_to_each_workers_device(string configured, int deviceIndex, string expected) =>
        Assert.Equal(expected, TorchSetup.DeviceName(configured, deviceIndex));

    [Theory]
    [InlineData("gpu")]
    [InlineData("CUDA")]
    [InlineData("cuda:")]
    [InlineData("cuda:-1")]
    [InlineData("cuda:+1")]
    [InlineData("cuda:x")]
    [InlineData("cuda: 1")]
    [InlineData("cuda1")]
    [InlineData("")]
    public void Refuses_other_device_strings_naming_the_key(string configured)
    {
        var ex = Assert.Throws<ConfigException>(() => TorchSetup.DeviceName(configured, 0));
        Assert.Contains("elasticmoe.device", ex.Message);
        Assert.Contains($"\"{configured}\"", ex.Message);
    }

    [Fact]
    public void Refuses_a_negative_device_index_and_an_overflowing_one()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => TorchSetup.DeviceName("cuda", -1));
        Assert.Throws<ConfigException>(() => TorchSetup.DeviceName($"cuda:{int.MaxValue}", 1));
    }

    [Theory]
    [InlineData("cuda", true)]
    [InlineData("cuda:3", true)]
    [InlineData("cuda:x", false)]
    [InlineData("cudax", false)]
    public void The_config_accepts_exactly_the_mapped_forms(string device, bool accepted)
    {
        if (accepted) Assert.Equal(device, ConfigLoader.Load(null, [new("device", device)]).Device);
        else Assert.Contains("elasticmoe.device", Assert.Throws<ConfigException>(() => ConfigLoader.Load(null, [new("device", device)])).Message);
    }

    [Fact]
    public void Cpu_resolves_to_the_cpu_for_every_worker()
    {
        var config = TestSupport.SmallConfig();
        Assert.Equal(DeviceType.CPU, TorchSetup.ResolveDevice(config).type);
        Assert.Equal(DeviceType.CPU, TorchSetup.ResolveDevice(config, 3).type);
    }

    [Fact]
    public void Cuda_without_cuda_is_a_clear_error_naming_the_workers_device()
    {
        TestSupport.EnsureTorch();
        if (torch.cuda.is_available()) return; // only meaningful on a machine (or build) without CUDA
        var config = TestSupport.SmallConfig(("device", "cuda:1"));
        var ex = Assert.Throws<ConfigException>(() => TorchSetup.ResolveDevice(config, 2));
        Assert.Contains("elasticmoe.device", ex.Message);
        Assert.Contains("cuda:3", ex.Message);
        Assert.Contains("CUDA is not available", ex.Message);
        Assert.Throws<ConfigException>(() => TorchSetup.ResolveDevice(config));
    }
}
