using ElasticMoE.Checkpointing;
using ElasticMoE.Cli;
using ElasticMoE.State;
using static ElasticMoE.Tests.Checkpointing.CheckpointKit;

namespace ElasticMoE.Tests.Checkpointing;

/// <summary><c>elasticmoe checkpoints list|verify|export</c>, in-process.</summary>
public class CheckpointCliTests
{
    private static (int Code, string Out, string Err) Run(params string[] args)
    {
        var o = new StringWriter();
        var e = new StringWriter();
        int code = Program.Run(args, o, e);
        return (code, o.ToString(), e.ToString());
    }

    [Fact]
    public void List_verify_and_export_a_good_run_directory()
    {
        var (dir, _) = RunWithCheckpoints(1, 2);
        var (code, output, err) = Run("checkpoints", "list", "--run-dir", dir);
        Assert.True(code == 0, err);
        Assert.Contains("step-000001", output);
        Assert.Contains("step-000002", output);

        (code, output, err) = Run("checkpoints", "verify", "--run-dir", dir);
        Assert.True(code == 0, err);
        Assert.Contains("ok   step 2", output);

        var model = Path.Combine(TestSupport.TempDir(), "model.safetensors");
        (code, output, err) = Run("checkpoints", "export", "--run-dir", dir, "--out", model);
        Assert.True(code == 0, err);
        Assert.Contains("exported step 2", output);
        Assert.Equal("2", Safetensors.Read(File.ReadAllBytes(model)).Metadata["step"]);
    }

    [Fact]
    public void Verify_exits_2_naming_each_bad_file_and_export_falls_back_with_a_warning()
    {
        var (dir, _) = RunWithCheckpoints(1, 2);
        var newest = new CheckpointStore(dir).List()[^1];
        var shard = Path.Combine(dir, newest.Directory, newest.Files.Single());
        File.WriteAllBytes(shard, File.ReadAllBytes(shard)[..1000]);
        var (code, _, err) = Run("checkpoints", "verify", "--run-dir", dir);
        Assert.Equal(Program.ExitCodes.BadInput, code);
        Assert.Contains($"{newest.Directory}/{newest.Files.Single()}", err);
        Assert.Contains("truncated", err);

        var model = Path.Combine(TestSupport.TempDir(), "model.safetensors");
        (code, var output, err) = Run("checkpoints", "export", "--run-dir", dir, "--out", model);
        Assert.True(code == 0, err);
        Assert.Contains("exported step 1", output);
        Assert.Contains(newest.Files.Single(), err);
    }

    [Fact]
    public void A_run_directory_without_checkpoints_is_a_clear_error_for_export_and_resume()
    {
        var empty = TestSupport.TempDir();
        var (code, _, err) = Run("checkpoints", "export", "--run-dir", empty, "--out", Path.Combine(empty, "m.safetensors"));
        Assert.Equal(Program.ExitCodes.BadInput, code);
        Assert.Contains("no committed checkpoint", err);
    }
}
