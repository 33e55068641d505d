using System.Text;
using ElasticMoE.Checkpointing;
using Xunit.Abstractions;
using static ElasticMoE.Tests.Checkpointing.CheckpointKit;

namespace ElasticMoE.Tests.Checkpointing;

/// <summary>
/// Damage to a committed checkpoint — a flipped bit, a truncated or deleted file, an edited manifest —
/// is found before anything loads, verification names the bad file, and loading falls back to the
/// previous committed checkpoint, whose values are what a trainer then holds.
/// </summary>
public class CheckpointCorruptionTests(ITestOutputHelper output)
{
    private enum Damage { BitFlip, Truncation, Deletion, ManifestEdit }

    [Fact]
    public void A_hundred_random_corruptions_are_all_detected_and_loading_falls_back_to_the_previous_checkpoint()
    {
        var (pristine, states) = RunWithCheckpoints(1, 2);
        var random = new Random(9);
        var counts = new Dictionary<Damage, int>();
        for (int i = 0; i < 100; i++)
        {
            var dir = Path.Combine(TestSupport.TempDir(), "run");
            CopyDirectory(pristine, dir);
            var newest = new CheckpointStore(dir).List()[^1];
            Assert.Equal(2, newest.Step);
            var damage = (Damage)(i % 4);
            counts[damage] = counts.GetValueOrDefault(damage) + 1;
            var bad = Corrupt(Path.Combine(dir, newest.Directory), damage, random);
            var badName = $"{newest.Directory}/{Path.GetFileName(bad)}";

            var store = new CheckpointStore(dir);
            var problems = store.Verify(2);
            Assert.True(problems.Count > 0, $"{damage} of {badName} went undetected");
            Assert.Contains(problems, p => p.File == badName);
            Assert.Empty(store.Verify(1));

            var load = store.LoadNewestValid();
            Assert.Equal(1, load.Checkpoint!.Step);
            Assert.Contains(load.Warnings, w => w.Contains(badName, StringComparison.Ordinal));

            // Every tenth case end to end: a trainer resumes from the older checkpoint's exact state.
            if (i % 10 == 0)
            {
                using var t = NewTrainer();
                Assert.NotEmpty(t.Load(dir));
                Assert.Equal(states[1], TrainingSnapshot(t));
            }
        }
        output.WriteLine(string.Join(", ", counts.Select(kv => $"{kv.Key} {kv.Value}")));
    }

    [Fact]
    public void When_every_committed_checkpoint_is_damaged_nothing_is_loaded_and_the_error_names_each_bad_file()
    {
        var (pristine, _) = RunWithCheckpoints(1, 2);
        var dir = Path.Combine(TestSupport.TempDir(), "run");
        CopyDirectory(pristine, dir);
        var random = new Random(3);
        var bad = new CheckpointStore(dir).List().Select(c => Corrupt(Path.Combine(dir, c.Directory), Damage.BitFlip, random)).ToList();
        using var t = NewTrainer();
        var before = TrainingSnapshot(t);
        var e = Assert.Throws<CheckpointCorruptException>(() => t.Load(dir));
        foreach (var file in bad) Assert.Contains(Path.GetFileName(file), e.Message);
        Assert.Equal(before, TrainingSnapshot(t));
    }

    [Fact]
    public void A_damaged_commit_line_is_reported_and_its_checkpoint_does_not_count()
    {
        var (pristine, _) = RunWithCheckpoints(1, 2);
        var log = Path.Combine(pristine, FileCommitLog.FileName);
        var bytes = File.ReadAllBytes(log);
        int secondLine = Array.IndexOf(bytes, (byte)'\n') + 1;
        bytes[secondLine + 30] ^= 0x04;
        File.WriteAllBytes(log, bytes);
        var load = new CheckpointStore(pristine).LoadNewestValid();
        Assert.Equal(1, load.Checkpoint!.Step);
        Assert.Contains(load.Warnings, w => w.Contains("line 2", StringComparison.Ordinal));
    }

    /// <summary>Damages one file of a checkpoint directory; returns its path.</summary>
    private static string Corrupt(string checkpoint, Damage damage, Random random)
    {
        var files = Directory.GetFiles(checkpoint).Order(StringComparer.Ordinal).ToArray();
        var manifest = Path.Combine(checkpoint, CheckpointManifest.FileName);
        var file = damage == Damage.ManifestEdit ? manifest : files[random.Next(files.Length)];
        var bytes = File.ReadAllBytes(file);
        switch (damage)
        {
            case Damage.BitFlip:
                bytes[random.Next(bytes.Length)] ^= (byte)(1 << random.Next(8));
                File.WriteAllBytes(file, bytes);
                break;
            case Damage.Truncation:
                File.WriteAllBytes(file, bytes[..random.Next(bytes.Length)]);
                break;
            case Damage.Deletion:
                File.Delete(file);
                break;
            case Damage.ManifestEdit:
                // An edit that keeps the manifest valid JSON: a size, a hash or a unit's place changed,
                // the way someone "fixing" a damaged checkpoint by hand would.
                var text = Encoding.UTF8.GetString(bytes);
                var edited = random.Next(3) switch
                {
                    0 => text.Replace("\"bytes\": ", "\"bytes\": 1"),
                    1 => System.Text.RegularExpressions.Regex.Replace(text, "\"sha256\": \"[0-9a-f]", "\"sha256\": \"0"),
                    _ => text.Replace("\"step\": 2", "\"step\": 3"),
                };
                Assert.NotEqual(text, edited);
                File.WriteAllText(file, edited);
                break;
        }
        return file;
    }
}
