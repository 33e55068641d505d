using ElasticMoE.Configuration;
using ElasticMoE.Model;
using ElasticMoE.State;
using ElasticMoE.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace ElasticMoE.Tests.State;

public class StateUnitTests
{
    private readonly ModelOptions _options = TestSupport.SmallConfig().Model;

    private static AdamW NewOptimizer() => new(0.9, 0.95, 1e-8, 0.1);

    private MoETransformer NewModel(long seed, ModelOptions? options = null) => new(options ?? _options, seed);

    /// <summary>Fresh gradients of a next-byte loss on a batch drawn from <paramref name="batchSeed"/>.</summary>
    private void Backward(MoETransformer model, int batchSeed)
    {
        using var scope = NewDisposeScope();
        var rng = new Random(batchSeed);
        int b = 2, t = _options.Context;
        var data = new long[b * (t + 1)];
        for (int i = 0; i < data.Length; i++) data[i] = rng.Next(_options.VocabSize);
        var all = tensor(data).reshape(b, t + 1);
        var x = all.narrow(1, 0, t);
        var y = all.narrow(1, 1, t);
        model.zero_grad();
        MoETransformer.CrossEntropy(model.forward(x), y).backward();
    }

    /// <summary>Steps [from, to) through the units, with a router-bias update so buffers hold state too.</summary>
    private void TrainUnits(MoETransformer model, SortedDictionary<UnitId, StateUnit> units, AdamW optimizer, int from, int to)
    {
        for (int step = from; step < to; step++)
        {
            Backward(model, step);
            foreach (var unit in units.Values) Assert.True(optimizer.StepUnit(unit, step, Lr(step), 0.8));
            var counts = model.TakeExpertCounts();
            int layer = 0;
            foreach (var moe in model.MoELayers) moe.Router.UpdateBias(counts[layer++], 1e-3);
        }
    }

    private static double Lr(int step) => 1e-2 / (1 + step);

    private static byte[] Bytes(Tensor t)
    {
        using var scope = NewDisposeScope();
        return t.detach().cpu().contiguous().bytes.ToArray();
    }

    private static void AssertSameState(StateUnit expected, StateUnit actual)
    {
        Assert.Equal(expected.Id, actual.Id);
        Assert.Equal(expected.AppliedStep, actual.AppliedStep);
        Assert.Equal(expected.Tensors.Select(t => (t.Name, t.IsParameter)), actual.Tensors.Select(t => (t.Name, t.IsParameter)));
        for (int i = 0; i < expected.Tensors.Count; i++)
            Assert.True(Bytes(expected.Tensors[i].Value).AsSpan().SequenceEqual(Bytes(actual.Tensors[i].Value)), expected.Tensors[i].Name);
        Assert.Equal(expected.Moments.Keys.Order(StringComparer.Ordinal), actual.Moments.Keys.Order(StringComparer.Ordinal));
        foreach (var (name, (m, v)) in expected.Moments)
        {
            Assert.True(Bytes(m).AsSpan().SequenceEqual(Bytes(actual.Moments[name].M)), "adam_m/" + name);
            Assert.True(Bytes(v).AsSpan().SequenceEqual(Bytes(actual.Moments[name].V)), "adam_v/" + name);
        }
        Assert.Equal(expected.Checksum(), actual.Checksum());
    }

    private static void DisposeAll(SortedDictionary<UnitId, StateUnit> units)
    {
        foreach (var u in units.Values) u.Dispose();
    }

    [Fact]
    public void Bind_covers_every_parameter_exactly_once_and_the_units_are_the_catalog()
    {
        using var model = NewModel(1);
        var units = UnitBinding.Bind(model);
        Assert.Equal(UnitCatalog.All(_options), units.Keys);

        var bound = units.Values.SelectMany(u => u.Tensors.Select(t => (u.Id, t.Name, t.IsParameter))).ToList();
        var parameters = model.named_parameters().Select(p => p.name).Order(StringComparer.Ordinal).ToList();
        Assert.Equal(parameters, bound.Where(b => b.IsParameter).Select(b => b.Name).Order(StringComparer.Ordinal));
        var biases = model.named_buffers().Select(b => b.name).Where(n => n.EndsWith(".ffn.router.expert_bias", StringComparison.Ordinal));
        Assert.Equal(biases.Order(StringComparer.Ordinal), bound.Where(b => !b.IsParameter).Select(b => b.Name).Order(StringComparer.Ordinal));
        Assert.All(bound, b => Assert.Equal(b.Id, UnitCatalog.OfTensor(b.Name)));
        Assert.All(units.Values.Where(u => u.Id.Kind == UnitKind.RouterBias), u => Assert.DoesNotContain(u.Tensors, t => t.IsParameter));
        Assert.All(units.Values, u => Assert.Equal(-1, u.AppliedStep));
        Assert.All(units.Values, u => Assert.Empty(u.Moments));

        // The unit's tensors are the model's own: a change through the unit shows in the model.
        var embed = units[UnitId.Embedding].Tensors.Single();
        using (no_grad()) embed.Value.fill_(Scalars.Of(0.25));
        using var fromModel = model.named_parameters().Single(p => p.name == embed.Name).parameter.detach();
        Assert.True(fromModel.eq(Scalars.Of(0.25)).all().item<bool>());

        long expectedBytes = model.named_parameters().Sum(p => p.parameter.numel() * 4) + biases.Count() * _options.MoE.RoutedExperts * 4L;
        Assert.Equal(expectedBytes, units.Values.Sum(u => u.ByteSize));
    }

    [Fact]
    public void Export_then_import_into_a_model_of_another_seed_gives_identical_state_and_training()
    {
        using var a = NewModel(1);
        using var b = NewModel(2);
        var unitsA = UnitBinding.Bind(a);
        var unitsB = UnitBinding.Bind(b);
        using var optA = NewOptimizer();
        using var optB = NewOptimizer();
        TrainUnits(a, unitsA, optA, 0, 3);
        Assert.NotEqual(unitsA[UnitId.Head].Checksum(), unitsB[UnitId.Head].Checksum());
        Assert.Contains(unitsA.Values, u => u.Id.Kind == UnitKind.Expert && u.Moments.Count > 0);

        foreach (var (id, unit) in unitsA)
            unitsB[id].Import(unit.Export());
        foreach (var (id, unit) in unitsA)
            AssertSameState(unit, unitsB[id]);

        // The moved state trains on exactly as the original: moments and step came along.
        TrainUnits(a, unitsA, optA, 3, 5);
        TrainUnits(b, unitsB, optB, 3, 5);
        foreach (var (id, unit) in unitsA)
            AssertSameState(unit, unitsB[id]);
        DisposeAll(unitsA);
        DisposeAll(unitsB);
    }

    [Fact]
    public void A_mirror_kept_from_packed_gradients_stays_bit_identical_to_the_original()
    {
        // What a buddy does with redundancy on: it never runs the model, it gets each step's gradients and
        // applies the same update. Experts that got no token travel as "no gradient" and stay untouched.
        using var a = NewModel(1);
        using var b = NewModel(2);
        var unitsA = UnitBinding.Bind(a);
        var unitsB = UnitBinding.Bind(b);
        using var optA = NewOptimizer();
        using var optB = NewOptimizer();
        var mirrored = unitsA.Keys.Where(u => u.Kind != UnitKind.RouterBias).ToList();
        foreach (var id in mirrored) unitsB[id].Import(unitsA[id].Export());
        bool sawMissing = false;
        for (int step = 0; step < 4; step++)
        {
            Backward(a, step);
            a.TakeExpertCounts();
            var fromA = mirrored.Select(u => unitsA[u]).ToList();
            // An expert that got no token this step has no gradient (forced here for one expert on odd steps).
            if (step % 2 == 1)
                foreach (var (_, p) in fromA.First(u => u.Id.Kind == UnitKind.Expert).Parameters) p.grad = null;
            sawMissing |= fromA.SelectMany(u => u.Parameters).Any(p => p.Param.grad is null);
            using (var packed = ElasticMoE.Runtime.Engine.MirrorParts.Pack(fromA))
                ElasticMoE.Runtime.Engine.MirrorParts.Unpack(packed, mirrored.Select(u => unitsB[u]).ToList());
            foreach (var id in mirrored)
            {
                Assert.Equal(optA.StepUnit(unitsA[id], step, Lr(step), 0.8), optB.StepUnit(unitsB[id], step, Lr(step), 0.8));
                foreach (var (_, p) in unitsA[id].Parameters) p.grad = null;
                foreach (var (_, p) in unitsB[id].Parameters) p.grad = null;
            }
        }
        Assert.True(sawMissing, "the batch should leave some expert without tokens");
        foreach (var id in mirrored) AssertSameState(unitsA[id], unitsB[id]);
        // A frame made of other units is refused, naming them.
        using var wrong = ElasticMoE.Runtime.Engine.MirrorParts.Pack([unitsA[UnitId.Head]]);
        Assert.Contains("embed", Assert.Throws<InvalidOperationException>(() => ElasticMoE.Runtime.Engine.MirrorParts.Unpack(wrong, [unitsB[UnitId.Embedding]])).Message);
        DisposeAll(unitsA);
        DisposeAll(unitsB);
    }

    [Fact]
    public void Export_is_deterministic_and_carries_its_metadata()
    {
        using var a = NewModel(1);
        var units = UnitBinding.Bind(a);
        using var opt = NewOptimizer();
        TrainUnits(a, units, opt, 0, 2);
        var unit = units[UnitId.OfBlock(1)];
        var blob = unit.Export();
        Assert.Equal(blob, unit.Export());
        var file = Safetensors.Read(blob);
        Assert.Equal(StateUnit.Format, file.Metadata["format"]);
        Assert.Equal("block.1", file.Metadata["unit"]);
        Assert.Equal("1", file.Metadata["applied_step"]);
        Assert.Equal(unit.Checksum().ToString("x16"), file.Metadata["checksum"]);
        Assert.All(unit.Tensors, t => Assert.True(file.Contains("param/" + t.Name)));
        Assert.All(unit.Moments.Keys, n => Assert.True(file.Contains("adam_m/" + n) && file.Contains("adam_v/" + n)));
        Assert.Equal(unit.Tensors.Count + 2 * unit.Moments.Count, file.Entries.Count);
        Assert.True(Safetensors.Read(units[UnitId.OfRouterBias(1)].Export()).Contains("buffer/blocks.1.ffn.router.expert_bias"));
        DisposeAll(units);
    }

    /// <summary>A trained source and a differently trained target, both bound; the expert unit with moments is chosen.</summary>
    private (MoETransformer A, MoETransformer B, SortedDictionary<UnitId, StateUnit> UnitsA, SortedDictionary<UnitId, StateUnit> UnitsB, UnitId Expert)
        TwoTrainedModels()
    {
        var a = NewModel(1);
        var b = NewModel(2);
        var unitsA = UnitBinding.Bind(a);
        var unitsB = UnitBinding.Bind(b);
        using var optA = NewOptimizer();
        using var optB = NewOptimizer();
        TrainUnits(a, unitsA, optA, 0, 3);
        TrainUnits(b, unitsB, optB, 0, 2);
        var expert = unitsA.Values.Where(u => u.Id.Kind == UnitKind.Expert && unitsB[u.Id].Moments.Count > 0)
            .OrderByDescending(u => u.Moments.Count).First().Id;
        Assert.NotEmpty(unitsA[expert].Moments);
        return (a, b, unitsA, unitsB, expert);
    }

    private static void AssertRejected(StateUnit target, ReadOnlyMemory<byte> blob, string? expected = null)
    {
        var before = target.Checksum();
        var e = Assert.Throws<UnitFormatException>(() => target.Import(blob));
        Assert.StartsWith($"unit {target.Id}: ", e.Message);
        if (expected is not null) Assert.Contains(expected, e.Message);
        Assert.Equal(before, target.Checksum());
    }

    [Fact]
    public void Import_rejects_every_flipped_bit_and_leaves_the_unit_unchanged()
    {
        var (a, b, unitsA, unitsB, expert) = TwoTrainedModels();
        var target = unitsB[expert];
        var snapshot = target.Tensors.Select(t => Bytes(t.Value)).ToList();
        var moments = target.Moments.ToDictionary(kv => kv.Key, kv => (Bytes(kv.Value.M), Bytes(kv.Value.V)));
        long step = target.AppliedStep;
        var before = target.Checksum();

        var blob = unitsA[expert].Export();
        int dataStart = (int)Safetensors.Read(blob).DataOffset;
        int rejected = 0;
        for (int i = 0; i < blob.Length; i++)
        {
            // Every bit of the length and header; one bit (rotating) of each data byte.
            for (int bit = 0; bit < 8; bit++)
            {
                if (i >= dataStart && bit != i % 8) continue;
                blob[i] ^= (byte)(1 << bit);
                try
                {
                    target.Import(blob);
                    Assert.Fail($"a blob with bit {bit} of byte {i} flipped was imported");
                }
                catch (UnitFormatException)
                {
                    rejected++;
                }
                blob[i] ^= (byte)(1 << bit);
            }
        }
        Assert.True(rejected > blob.Length);
        Assert.Equal(before, target.Checksum());
        Assert.Equal(step, target.AppliedStep);
        Assert.Equal(snapshot, target.Tensors.Select(t => Bytes(t.Value)));
        Assert.Equal(moments.Keys.Order(), target.Moments.Keys.Order());
        foreach (var (name, (m, v)) in moments)
        {
            Assert.Equal(m, Bytes(target.Moments[name].M));
            Assert.Equal(v, Bytes(target.Moments[name].V));
        }

        // The intact blob still imports.
        target.Import(blob);
        AssertSameState(unitsA[expert], target);
        DisposeAll(unitsA);
        DisposeAll(unitsB);
        a.Dispose();
        b.Dispose();
    }

    [Fact]
    public void Import_rejects_a_truncated_blob()
    {
        var (a, b, unitsA, unitsB, expert) = TwoTrainedModels();
        var blob = unitsA[expert].Export();
        foreach (var length in new[] { 0, 7, 8, 100, blob.Length / 2, blob.Length - 1 })
            AssertRejected(unitsB[expert], blob.AsMemory(0, length), "not valid safetensors");
        DisposeAll(unitsA);
        DisposeAll(unitsB);
        a.Dispose();
        b.Dispose();
    }

    [Fact]
    public void Import_rejects_a_blob_of_another_unit()
    {
        var (a, b, unitsA, unitsB, expert) = TwoTrainedModels();
        var sibling = UnitId.OfExpert(expert.Block, (expert.Expert + 1) % _options.MoE.RoutedExperts);
        AssertRejected(unitsB[sibling], unitsA[expert].Export(), $"holds unit '{expert}'");
        AssertRejected(unitsB[UnitId.Head], unitsA[UnitId.Embedding].Export(), "holds unit 'embed'");
        DisposeAll(unitsA);
        DisposeAll(unitsB);
        a.Dispose();
        b.Dispose();
    }

    [Fact]
    public void Import_rejects_a_shape_mismatch()
    {
        var (a, b, unitsA, unitsB, expert) = TwoTrainedModels();
        var wider = _options with { MoE = _options.MoE with { ExpertHidden = _options.MoE.ExpertHidden * 2 } };
        using var c = NewModel(3, wider);
        var unitsC = UnitBinding.Bind(c);
        AssertRejected(unitsC[expert], unitsA[expert].Export(), "has shape");
        AssertRejected(unitsB[expert], unitsC[expert].Export(), "has shape");
        DisposeAll(unitsA);
        DisposeAll(unitsB);
        DisposeAll(unitsC);
        a.Dispose();
        b.Dispose();
    }

    /// <summary>Rewrites a blob's entries (same metadata), as a buggy or hostile sender might.</summary>
    private static byte[] Rewrite(byte[] blob, Func<IEnumerable<(string Name, Tensor Value)>, IEnumerable<(string Name, Tensor Value)>> change,
        Func<IReadOnlyDictionary<string, string>, IReadOnlyDictionary<string, string>>? metadata = null)
    {
        using var scope = NewDisposeScope();
        var file = Safetensors.Read(blob);
        var entries = file.Entries.Select(e => (e.Name, file.ToTensor(e.Name))).ToList();
        return Safetensors.Write(change(entries), metadata is null ? file.Metadata : metadata(file.Metadata));
    }

    [Fact]
    public void Import_rejects_missing_extra_unpaired_and_mistyped_entries_and_bad_metadata()
    {
        var (a, b, unitsA, unitsB, expert) = TwoTrainedModels();
        var target = unitsB[expert];
        var blob = unitsA[expert].Export();
        var param = unitsA[expert].Tensors[0].Name;
        using var scope = NewDisposeScope();

        AssertRejected(target, Rewrite(blob, es => es.Where(e => e.Name != "param/" + param)), "lacks param/" + param);
        AssertRejected(target, Rewrite(blob, es => es.Append(("param/bogus", zeros(1)))), "'param/bogus'");
        AssertRejected(target, Rewrite(blob, es => es.Append(("extra", zeros(1)))), "no unit tensor");
        AssertRejected(target, Rewrite(blob, es => es.Where(e => e.Name != "adam_v/" + param)), "without 'adam_v/" + param + "'");
        AssertRejected(target, Rewrite(blob, es => es.Select(e => e.Name == "param/" + param ? (e.Name, e.Value.to(ScalarType.Float64)) : e)), "is F64, not F32");
        AssertRejected(target, Rewrite(blob, es => es.Select(e => e.Name.StartsWith("param/") ? ("buffer/" + e.Name[6..], e.Value) : e)), "lacks");
        // Same names and shapes, different numbers: only the checksum can tell.
        AssertRejected(target, Rewrite(blob, es => es.Select(e => e.Name == "param/" + param ? (e.Name, e.Value.neg()) : e)), "checksum mismatch");

        Dictionary<string, string> With(IReadOnlyDictionary<string, string> m, string key, string? value)
        {
            var d = m.ToDictionary();
            if (value is null) d.Remove(key);
            else d[key] = value;
            return d;
        }
        AssertRejected(target, Rewrite(blob, es => es, m => With(m, "format", "elasticmoe.unit.v0")), "format");
        AssertRejected(target, Rewrite(blob, es => es, m => With(m, "checksum", null)), "no 'checksum'");
        AssertRejected(target, Rewrite(blob, es => es, m => With(m, "applied_step", "+2")), "not a step");
        AssertRejected(target, Rewrite(blob, es => es, m => With(m, "applied_step", "-2")), "not a step");
        AssertRejected(target, Rewrite(blob, es => es, m => With(m, "extra", "x")), "unexpected metadata: extra");
        var checksum = Safetensors.Read(blob).Metadata["checksum"];
        if (checksum.Any(char.IsLetter)) // canonical lower-case hex only
            AssertRejected(target, Rewrite(blob, es => es, m => With(m, "checksum", checksum.ToUpperInvariant())), "checksum mismatch");
        DisposeAll(unitsA);
        DisposeAll(unitsB);
        a.Dispose();
        b.Dispose();
    }

    [Fact]
    public void Release_poisons_values_drops_gradients_and_frees_moments()
    {
        using var model = NewModel(1);
        var units = UnitBinding.Bind(model);
        using var opt = NewOptimizer();
        TrainUnits(model, units, opt, 0, 2);
        var head = units[UnitId.Head];
        var blob = head.Export();
        Assert.NotEmpty(head.Moments);
        var moments = head.Moments.Values.ToList();

        head.Release();
        Assert.Empty(head.Moments);
        Assert.All(moments, mv => Assert.True(mv.M.IsInvalid && mv.V.IsInvalid));
        Assert.Equal(-1, head.AppliedStep);
        foreach (var (_, t, _) in head.Tensors)
        {
            Assert.True(t.isnan().all().item<bool>());
            Assert.Null(t.grad);
        }
        Assert.Equal(head.Tensors.Sum(t => t.Value.numel() * 4), head.ByteSize);
        using (var scope = NewDisposeScope())
        {
            var logits = model.forward(zeros(1, 4, dtype: ScalarType.Int64));
            Assert.True(logits.isnan().all().item<bool>()); // stale state is loud
        }

        // A released unit can be held again.
        head.Import(blob);
        Assert.Equal(1, head.AppliedStep);
        Assert.False(head.Tensors[0].Value.isnan().any().item<bool>());
        DisposeAll(units);
    }

    [Fact]
    public void StepUnit_gives_the_same_bits_as_Step()
    {
        using var a = NewModel(7);
        using var b = NewModel(7);
        using var optA = NewOptimizer();
        using var optB = NewOptimizer();
        var units = UnitBinding.Bind(b);
        var paramsA = a.named_parameters().ToDictionary(p => p.name, p => p.parameter);
        var scales = new[] { 1.0, 0.7, 1.0, 0.3 };
        for (int step = 0; step < scales.Length; step++)
        {
            Backward(a, step);
            using (var scope = NewDisposeScope())
                foreach (var (name, p) in b.named_parameters())
                    p.grad = paramsA[name].grad is { } g ? g.clone() : null;

            optA.Step(a.named_parameters().Select(p => (p.name, (Tensor)p.parameter)), Lr(step), scales[step]);
            Assert.Equal(step + 1, optA.StepCount);
            foreach (var unit in units.Values) Assert.True(optB.StepUnit(unit, step, Lr(step), scales[step]));
            Assert.Equal(0, optB.StepCount); // StepUnit keeps no counter of its own
        }

        foreach (var (name, p) in b.named_parameters())
            Assert.True(Bytes(paramsA[name]).AsSpan().SequenceEqual(Bytes(p)), name);
        var unitMoments = units.Values.SelectMany(u => u.Moments).ToDictionary();
        Assert.Equal(optA.Moments.Keys.Order(StringComparer.Ordinal), unitMoments.Keys.Order(StringComparer.Ordinal));
        foreach (var (name, (m, v)) in optA.Moments)
        {
            Assert.True(Bytes(m).AsSpan().SequenceEqual(Bytes(unitMoments[name].M)), "m " + name);
            Assert.True(Bytes(v).AsSpan().SequenceEqual(Bytes(unitMoments[name].V)), "v " + name);
        }
        Assert.All(units.Values, u => Assert.Equal(scales.Length - 1, u.AppliedStep));
        DisposeAll(units);
    }

    [Fact]
    public void StepUnit_applies_each_step_at_most_once()
    {
        using var model = NewModel(1);
        var units = UnitBinding.Bind(model);
        using var opt = NewOptimizer();
        var unit = units[UnitId.OfBlock(0)];
        Backward(model, 0);

        Assert.True(opt.StepUnit(unit, 5, 1e-2));
        Assert.Equal(5, unit.AppliedStep);
        var after = unit.Checksum();
        Assert.False(opt.StepUnit(unit, 5, 1e-2)); // redone
        Assert.False(opt.StepUnit(unit, 3, 1e-2)); // older
        Assert.Equal(after, unit.Checksum());
        Assert.True(opt.StepUnit(unit, 6, 1e-2));
        Assert.NotEqual(after, unit.Checksum());
        Assert.Throws<ArgumentOutOfRangeException>(() => opt.StepUnit(unit, -1, 1e-2));
        DisposeAll(units);
    }

    [Fact]
    public void Checksum_changes_with_any_part_of_the_state()
    {
        using var model = NewModel(1);
        var units = UnitBinding.Bind(model);
        using var opt = NewOptimizer();
        TrainUnits(model, units, opt, 0, 1);
        var unit = units[UnitId.Head];
        var c0 = unit.Checksum();
        Assert.Equal(c0, unit.Checksum());

        var m = unit.Moments.Values.First().M;
        using (no_grad())
        using (var first = m.view(-1)[0])
        using (var saved = first.clone())
        {
            first.add_(Scalars.Of(1.0), Scalars.One);
            Assert.NotEqual(c0, unit.Checksum());
            first.copy_(saved);
        }
        Assert.Equal(c0, unit.Checksum());

        // Without gradients an update changes nothing but the applied step, which the checksum covers too.
        foreach (var (_, t, isParameter) in unit.Tensors)
            if (isParameter) t.grad = null;
        Assert.True(opt.StepUnit(unit, 7, 1e-2));
        Assert.NotEqual(c0, unit.Checksum());
        DisposeAll(units);
    }

    [Fact]
    public void Unit_operations_leak_no_tensors()
    {
        using var model = NewModel(1);
        using var other = NewModel(2);
        var units = UnitBinding.Bind(model);
        var targets = UnitBinding.Bind(other);
        using var opt = NewOptimizer();
        Backward(model, 0);

        void Cycle(int step)
        {
            foreach (var (id, unit) in units)
            {
                opt.StepUnit(unit, step, 1e-3, 0.5);
                unit.Checksum();
                var blob = unit.Export();
                targets[id].Import(blob);
                try { targets[id].Import(blob.AsMemory(0, blob.Length - 1)); }
                catch (UnitFormatException) { }
                targets[id].Release();
                targets[id].Import(blob);
                _ = unit.ByteSize;
            }
        }

        Cycle(0); // creates the moments, which the units own from then on
        var stats = DisposeScopeManager.Statistics.TensorStatistics;
        long live = stats.ThreadTotalLiveCount;
        for (int step = 1; step < 4; step++) Cycle(step);
        Assert.Equal(live, DisposeScopeManager.Statistics.TensorStatistics.ThreadTotalLiveCount);

        long withMoments = DisposeScopeManager.Statistics.TensorStatistics.ThreadTotalLiveCount;
        int momentTensors = units.Values.Sum(u => 2 * u.Moments.Count) + targets.Values.Sum(u => 2 * u.Moments.Count);
        DisposeAll(units);
        DisposeAll(targets);
        Assert.Equal(withMoments - momentTensors, DisposeScopeManager.Statistics.TensorStatistics.ThreadTotalLiveCount);
    }
}
