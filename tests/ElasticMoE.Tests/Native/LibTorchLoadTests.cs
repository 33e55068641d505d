using ElasticMoE.Native;
using TorchSharp;
using static TorchSharp.torch;

namespace ElasticMoE.Tests.Native;

public class LibTorchLoadTests
{
    [Fact]
    public void Libtorch_loads_and_computes_matmul_and_autograd()
    {
        LibTorchLoader.EnsureLoaded();
        using var a = tensor(new float[] { 1, 2, 3, 4 }, new long[] { 2, 2 }, requires_grad: true);
        using var y = a.matmul(a).sum();
        y.backward();
        Assert.Equal(54f, y.item<float>());           // [[7,10],[15,22]] sums to 54
        // d/dA sum(A·A) = 1·Aᵀ + Aᵀ·1 → [[7,11],[9,13]]
        Assert.Equal(new float[] { 7, 11, 9, 13 }, a.grad!.data<float>().ToArray());
    }

    [Fact]
    public void Shipped_LibTorchSharp_has_no_strong_need_for_a_missing_GLIBCXX_version()
    {
        LibTorchLoader.EnsureLoaded();
        var path = new[]
        {
            Path.Combine(AppContext.BaseDirectory, "runtimes", "linux-x64", "native", "libLibTorchSharp.so"),
            Path.Combine(AppContext.BaseDirectory, "libLibTorchSharp.so"),
        }.First(File.Exists);
        var needs = ElfVersionPatcher.ReadVersionNeeds(File.ReadAllBytes(path));
        Assert.Contains(needs, n => n.Version.StartsWith("GLIBCXX_", StringComparison.Ordinal));
        // After start-up, 3.4.32 (absent from Debian 12's libstdc++) is weak, or the system has it.
        var v32 = needs.SingleOrDefault(n => n.Version == "GLIBCXX_3.4.32");
        if (v32 is not null && !LibTorchLoader.PatchedVersions.Contains("GLIBCXX_3.4.32"))
            Assert.True(v32.Weak || SystemHas("GLIBCXX_3.4.32"));
    }

    [Fact]
    public void Patcher_weakens_exactly_the_selected_need_and_is_idempotent()
    {
        var original = Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile),
            ".nuget", "packages", "torchsharp", "0.107.0", "runtimes", "linux-x64", "native", "libLibTorchSharp.so");
        if (!File.Exists(original))
            original = new[] { Path.Combine(AppContext.BaseDirectory, "runtimes", "linux-x64", "native", "libLibTorchSharp.so") }.First(File.Exists);
        var bytes = File.ReadAllBytes(original);
        var before = ElfVersionPatcher.ReadVersionNeeds(bytes);
        var changed = ElfVersionPatcher.WeakenVersionNeeds(bytes, n => n.Version == "GLIBCXX_3.4.32");
        var after = ElfVersionPatcher.ReadVersionNeeds(bytes);

        Assert.True(after.Single(n => n.Version == "GLIBCXX_3.4.32").Weak);
        // Everything else is untouched.
        foreach (var (b, a) in before.Zip(after).Where(p => p.First.Version != "GLIBCXX_3.4.32"))
            Assert.Equal(b.Weak, a.Weak);
        Assert.True(changed.Count <= 1);
        Assert.Empty(ElfVersionPatcher.WeakenVersionNeeds(bytes, n => n.Version == "GLIBCXX_3.4.32"));
    }

    [Fact]
    public void Patcher_rejects_files_that_are_not_elf()
    {
        Assert.Throws<InvalidDataException>(() => ElfVersionPatcher.ReadVersionNeeds(new byte[128]));
    }

    private static bool SystemHas(string version)
        => File.Exists("/usr/lib/x86_64-linux-gnu/libstdc++.so.6")
           && System.Text.Encoding.ASCII.GetString(File.ReadAllBytes("/usr/lib/x86_64-linux-gnu/libstdc++.so.6")).Contains(version + "\0");
}
