namespace ElasticMoE.Cli;
public static class Program { public static int Main(string[] args) { ElasticMoE.Native.LibTorchLoader.EnsureLoaded(); Console.WriteLine("patched: " + string.Join(",", ElasticMoE.Native.LibTorchLoader.PatchedVersions)); return 0; } }
