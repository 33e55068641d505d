using System.Text.Json;
using ElasticMoE.Checkpointing;
using ElasticMoE.State;
using ElasticMoE.Tests.State;
using ElasticMoE.Training;
using TorchSharp;
using static TorchSharp.torch;
using static ElasticMoE.Tests.Checkpointing.CheckpointKit;

namespace ElasticMoE.Tests.Checkpointing;

public class CheckpointStoreTests
{
    [Fact]
    public void A_checkpoint_round_trips_the_training_state_bit_for_bit_and_training_continues_identically()
    {
        var dir = Path.Combine(TestSupport.TempDir(), "run");
        using var a = Trained(3);
        var commit = a.Save(dir);
        Assert.Equal(3, commit.Step);
        Assert.Equal("step-000003", commit.Directory);
        Assert.Empty(Directory.GetFiles(dir, "*" + DurableFile.TempSuffix, SearchOption.AllDirectories));

        using var b = NewTrainer();
        Assert.Empty(b.Load(dir));
        Assert.Equal(TrainingSnapshot(a), TrainingSnapshot(b));
        for (int i = 0; i < 3; i++) Assert.Equal(a.TrainStep().Loss, b.TrainStep().Loss);
        Assert.Equal(TrainingSnapshot(a), TrainingSnapshot(b));
    }

    [Fact]
    public void A_shard_is_one_standard_safetensors_file_holding_each_unit_once_with_its_metadata()
    {
        var dir = Path.Combine(TestSupport.TempDir(), "run");
        using var t = Trained(2);
        var commit = t.Save(dir);
        var shard = Safetensors.Read(File.ReadAllBytes(Path.Combine(dir, commit.Directory, commit.Files.Single())));
        var units = UnitBinding.Bind(t.Model);
        Assert.Equal(ShardFile.Format, shard.Metadata["format"]);
        Assert.Equal("2", shard.Metadata["step"]);
        Assert.Equal(string.Join(',', units.Keys), shard.Metadata["units"]);
        foreach (var (id, unit) in units)
        {
            Assert.Equal("1", shard.Metadata[$"{id}/applied_step"]);
            foreach (var (name, _, isParameter) in unit.Tensors)
                Assert.True(shard.Contains($"{id}/{(isParameter ? "param" : "buffer")}/{name}"), name);
            unit.Dispose();
        }
        Assert.Contains(shard.Entries, e => e.Name.StartsWith("block.0/adam_m/", StringComparison.Ordinal));
        Assert.Contains(shard.Entries, e => e.Name.StartsWith("embed/adam_v/", StringComparison.Ordinal));
        var manifest = CheckpointManifest.Parse(File.ReadAllBytes(Path.Combine(dir, commit.Directory, CheckpointManifest.FileName)));
        Assert.Equal(units.Keys, manifest.Units.Keys);
        Assert.Equal(TrainingState.RunFingerprint(t.Config, t.Sampler.Corpus.Fingerprint), manifest.RunFingerprint);
        Assert.Equal("single-process", manifest.Layout["mode"]);
    }

    [PythonNumpyFact]
    public void An_independent_python_numpy_reader_reads_a_shard_as_the_values_in_memory()
    {
        var dir = Path.Combine(TestSupport.TempDir(), "run");
        using var t = Trained(2);
        var commit = t.Save(dir);
        var path = Path.Combine(dir, commit.Directory, commit.Files.Single());
        using var doc = JsonDocument.Parse(PythonNumpy.Run(Reader, path));
        var tensors = doc.RootElement.GetProperty("tensors");
        var metadata = doc.RootElement.GetProperty("metadata");
        int compared = 0;
        void Compare(string name, Tensor expected)
        {
            var entry = tensors.GetProperty(name);
            Assert.Equal(expected.shape, entry.GetProperty("shape").EnumerateArray().Select(v => v.GetInt64()));
            var values = entry.GetProperty("values").EnumerateArray().Select(v => v.GetDouble()).ToArray();
            using var flat = expected.detach().cpu().reshape(-1).to(ScalarType.Float64);
            Assert.Equal(flat.data<double>().ToArray(), values);
            compared++;
        }
        var units = UnitBinding.Bind(t.Model);
        foreach (var (id, unit) in units)
        {
            foreach (var (name, value, isParameter) in unit.Tensors) Compare($"{id}/{(isParameter ? "param" : "buffer")}/{name}", value);
            foreach (var (name, _) in unit.Parameters)
                if (t.Optimizer.Moments.TryGetValue(name, out var mv))
                {
                    Compare($"{id}/adam_m/{name}", mv.M);
                    Compare($"{id}/adam_v/{name}", mv.V);
                }
            Assert.Equal("1", metadata.GetProperty($"{id}/applied_step").GetString());
            Assert.Matches("^[0-9a-f]{16}$", metadata.GetProperty($"{id}/checksum").GetString());
            unit.Dispose();
        }
        Assert.Equal(tensors.EnumerateObject().Count(), compared);
    }

    /// <summary>Only json, struct and numpy: the safetensors layout read by hand, no code of ours.</summary>
    private const string Reader = """
        import json, struct, sys
        import numpy as np
        data = open(sys.argv[1], 'rb').read()
        (n,) = struct.unpack('<Q', data[:8])
        header = json.loads(data[8:8 + n].decode('utf-8'))
        meta = header.pop('__metadata__', {})
        base = 8 + n
        out = {'metadata': meta, 'tensors': {}}
        for name, e in header.items():
            assert e['dtype'] == 'F32', e['dtype']
            b, end = e['data_offsets']
            a = np.frombuffer(data[base + b: base + end], dtype='<f4').reshape(e['shape'])
            out['tensors'][name] = {'shape': list(a.shape), 'values': [float(v) for v in a.astype(np.float64).ravel()]}
        print(json.dumps(out))
        """;

    [Fact]
    public void Each_unit_gets_exactly_one_writer_chosen_deterministically_and_balanced()
    {
        var shared = Enumerable.Range(0, 8).Select(e => UnitId.OfExpert(1, e)).ToList();
        var held = new Dictionary<string, IReadOnlyCollection<UnitId>>
        {
            ["w1"] = [UnitId.Embedding, UnitId.OfBlock(0), .. shared],
            ["w0"] = [UnitId.Embedding, UnitId.OfBlock(0), .. shared],
            ["w2"] = [UnitId.Head, .. shared.Take(4)],
        };
        var a = CheckpointWriters.Assign(held);
        var b = CheckpointWriters.Assign(held.Reverse().ToDictionary());
        Assert.Equal(a.Select(kv => (kv.Key, string.Join(',', kv.Value))), b.Select(kv => (kv.Key, string.Join(',', kv.Value))));
        var all = a.Values.SelectMany(u => u).ToList();
        Assert.Equal(all.Count, all.Distinct().Count());
        Assert.Equal(held.Values.SelectMany(u => u).Distinct().Order(), all.Order());
        foreach (var (writer, units) in a) Assert.All(units, u => Assert.Contains(u, held[writer]));
        // Replicas share the writing (greedy, so balanced within the units only some of them hold).
        Assert.All(a.Values, units => Assert.NotEmpty(units));
        Assert.InRange(Math.Abs(a["w0"].Count - a["w1"].Count), 0, 1);
    }

    [Fact]
    public void A_unit_written_by_two_shards_is_refused_at_commit()
    {
        var store = new CheckpointStore(Path.Combine(TestSupport.TempDir(), "run"));
        var blob = StateUnit.ExportRaw(UnitId.Head, 0, [new RawTensor("param/head.weight", "F32", [1], new byte[4])]);
        var dir = store.BeginSave(1);
        var x = ShardFile.Write(dir, "x", 1, [blob]);
        var y = ShardFile.Write(dir, "y", 1, [blob]);
        var e = Assert.Throws<ArgumentException>(() => store.Commit(dir, 1, "run", "model", new Dictionary<string, string>(), [x, y]));
        Assert.Contains("written once", e.Message);
        Assert.Empty(store.List());
    }

    [Fact]
    public void Retention_deletes_older_checkpoints_only_after_a_newer_one_is_committed()
    {
        var dir = Path.Combine(TestSupport.TempDir(), "run");
        using var t = NewTrainer();
        var seen = new List<string>();
        for (int i = 0; i < 4; i++)
        {
            t.TrainStep();
            // A crashed save of the next step sits in the run directory and must not count or survive.
            Directory.CreateDirectory(Path.Combine(dir, CheckpointStore.DirectoryName(t.Step)));
            var commit = t.Save(dir, keep: 2);
            seen.Add(commit.Directory);
            var expected = seen.TakeLast(2).ToList();
            Assert.Equal(expected, Directory.GetDirectories(dir).Select(Path.GetFileName).Order());
            Assert.Equal(expected, new CheckpointStore(dir).List().Select(c => c.Directory));
        }
        Assert.Equal(4, new CheckpointStore(dir).LoadNewestValid().Checkpoint!.Step);
    }

    [Fact]
    public void A_second_save_of_a_committed_step_goes_to_a_new_directory_and_wins()
    {
        var dir = Path.Combine(TestSupport.TempDir(), "run");
        using var t = Trained(1);
        var first = t.Save(dir, keep: 3);
        var second = t.Save(dir, keep: 3);
        Assert.Equal("step-000001", first.Directory);
        Assert.Equal("step-000001.2", second.Directory);
        var loaded = new CheckpointStore(dir).LoadNewestValid().Checkpoint!.Commit;
        Assert.Equal((second.Directory, second.ManifestSha256), (loaded.Directory, loaded.ManifestSha256));
    }

    [Fact]
    public void A_torn_commit_line_never_counts_and_the_next_commit_starts_on_a_line_of_its_own()
    {
        var dir = Path.Combine(TestSupport.TempDir(), "run");
        using var t = Trained(1);
        t.Save(dir);
        var log = Path.Combine(dir, FileCommitLog.FileName);
        var line = File.ReadAllLines(log)[0];
        File.AppendAllText(log, line[..(line.Length / 2)]);   // a commit of step 1 torn half-way
        var store = new CheckpointStore(dir);
        Assert.Single(store.List());
        Assert.Empty(store.Log.Read().Problems);
        t.TrainStep();
        t.Save(dir);
        Assert.Equal([1L, 2L], store.List().Select(c => c.Step));
        Assert.Empty(store.Log.Read().Problems);
        Assert.Equal(2, File.ReadAllLines(log).Length);
    }

    [Fact]
    public void Export_writes_the_models_parameters_and_router_biases_as_one_safetensors_file()
    {
        var dir = Path.Combine(TestSupport.TempDir(), "run");
        using var t = Trained(2);
        t.Save(dir);
        var output = Path.Combine(TestSupport.TempDir(), "model.safetensors");
        new CheckpointStore(dir).LoadNewestValid().Checkpoint!.ExportModel(output);
        var file = Safetensors.Read(File.ReadAllBytes(output));
        var expected = t.Model.state_dict();
        Assert.Equal(expected.Keys.Order(StringComparer.Ordinal), file.Entries.Select(e => e.Name));
        foreach (var (name, value) in expected) Assert.Equal(Bytes(value), file.Bytes(name).ToArray());
        Assert.Equal("2", file.Metadata["step"]);
        Assert.Equal(VerifiedCheckpoint.ModelFormat, file.Metadata["format"]);
    }

    [Fact]
    public void A_checkpoint_of_another_model_is_refused_and_nothing_is_loaded()
    {
        var dir = Path.Combine(TestSupport.TempDir(), "run");
        using (var t = Trained(1)) t.Save(dir);
        var cfg = TestSupport.SmallConfig(("model.moe.routed-experts", "6"));
        using var other = new Trainer(cfg, ElasticMoE.Data.TextCorpus.Default(cfg.Data.ValidationFraction, cfg.Model.Context));
        var before = TrainingSnapshot(other);
        var e = Assert.Throws<ElasticMoE.Configuration.ConfigException>(() => other.Load(dir));
        Assert.Contains("differs", e.Message);
        Assert.Equal(before, TrainingSnapshot(other));
    }
}
