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
}
