using System.CommandLine;

namespace ElasticMoE.Cli;

/// <summary><c>elasticmoe bench</c>: throughput and efficiency figures, each against a baseline measured in the same run.</summary>
public static class BenchCommand
{
    public static Command Create(TextWriter stdout, TextWriter stderr)
    {
        var cmd = new Command("bench", "measure tokens/s, MFU, memory flatness and data-plane throughput");
        cmd.SetAction(_ =>
        {
            stderr.WriteLine("bench: not built yet");
            return 1;
        });
        return cmd;
    }
}
