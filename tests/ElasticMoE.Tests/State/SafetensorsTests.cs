using System.Buffers.Binary;
using System.Text;
using System.Text.Json;
using ElasticMoE.State;
using TorchSharp;
using static TorchSharp.torch;

namespace ElasticMoE.Tests.State;

public class SafetensorsTests
{
    public SafetensorsTests() => TestSupport.EnsureTorch();

    /// <summary>One tensor of every supported dtype, plus a scalar and an empty tensor.</summary>
    private static List<(string Name, Tensor Value)> Sample() =>
    [
        ("f32", tensor(new[] { 0.1f, -2.5f, 3e-8f, 1e30f, float.MaxValue, -0f }).reshape(2, 3)),
        ("f64", tensor(new[] { Math.PI, -1e-300, 7.0, double.Epsilon })),
        ("f16", tensor(new[] { 1.5f, -0.25f, 65504f }).to(ScalarType.Float16)),
        ("bf16", tensor(new[] { 1.0f, -3.0f, 0.5f, 256f, -0.125f }).to(ScalarType.BFloat16)),
        ("i64", tensor(new long[] { long.MinValue, -1, 0, long.MaxValue }).reshape(4, 1)),
        ("i32", tensor(new[] { int.MinValue, 7, int.MaxValue })),
        ("i16", tensor(new short[] { -300, 300 })),
        ("i8", tensor(new sbyte[] { -128, 127 })),
        ("u8", tensor(new byte[] { 0, 1, 255 })),
        ("bool", tensor(new[] { true, false, true })),
        ("scalar", tensor(42.0f)),
        ("empty", zeros(0, 3)),
    ];

    private static Dictionary<string, string> Meta() => new() { ["format"] = "test", ["ünïcode"] = "✓ \"quoted\"" };

    private static bool SameBytes(Tensor a, Tensor b)
        => a.dtype == b.dtype && a.shape.SequenceEqual(b.shape) && a.contiguous().bytes.SequenceEqual(b.contiguous().bytes);

    [Fact]
    public void Round_trip_keeps_names_dtypes_shapes_bytes_and_metadata()
    {
        using var scope = NewDisposeScope();
        var sample = Sample();
        var file = Safetensors.Read(Safetensors.Write(sample, Meta()));

        Assert.Equal(sample.Select(s => s.Name).Order(StringComparer.Ordinal), file.Entries.Select(e => e.Name));
        Assert.Equal(Meta(), file.Metadata);
        foreach (var (name, value) in sample)
        {
            var e = file[name];
            Assert.Equal(value.dtype, e.ScalarType);
            Assert.Equal(Safetensors.DTypeOf(value.dtype), e.DType);
            Assert.Equal(value.shape, e.Shape);
            using var back = file.ToTensor(name);
            Assert.Equal(DeviceType.CPU, back.device_type);
            Assert.True(SameBytes(value, back), name);
        }
    }

    [Fact]
    public void Header_is_space_padded_to_8_and_data_follows_in_name_order()
    {
        using var scope = NewDisposeScope();
        var bytes = Safetensors.Write(Sample(), Meta());
        long n = (long)BinaryPrimitives.ReadUInt64LittleEndian(bytes);
        Assert.Equal(0, n % 8);
        var header = Encoding.UTF8.GetString(bytes, 8, (int)n);
        Assert.StartsWith("{", header);
        Assert.EndsWith("}", header.TrimEnd(' '));
        var file = Safetensors.Read(bytes);
        Assert.Equal(8 + n, file.DataOffset);
        long position = 0;
        foreach (var e in file.Entries) // name order
        {
            Assert.Equal(position, e.Begin);
            position = e.End;
        }
        Assert.Equal(bytes.Length - 8 - n, position);
    }

    [Fact]
    public void Writing_is_deterministic_and_the_stream_overload_writes_the_same_bytes()
    {
        using var scope = NewDisposeScope();
        var sample = Sample();
        var a = Safetensors.Write(sample, Meta());
        var reversed = Enumerable.Reverse(sample).ToList();
        var b = Safetensors.Write(reversed, Meta().Reverse().ToDictionary());
        using var ms = new MemoryStream();
        Safetensors.Write(ms, sample, Meta());
        Assert.Equal(a, b);
        Assert.Equal(a, ms.ToArray());
    }

    [Fact]
    public void A_strided_view_is_written_as_its_row_major_values()
    {
        using var scope = NewDisposeScope();
        var m = tensor(new[] { 0f, 1f, 2f, 3f, 4f, 5f }).reshape(2, 3);
        var t = m.t(); // [3, 2], not contiguous
        Assert.False(t.is_contiguous());
        var file = Safetensors.Read(Safetensors.Write([("t", t)]));
        using var back = file.ToTensor("t");
        Assert.Equal(new long[] { 3, 2 }, back.shape);
        Assert.Equal(new[] { 0f, 3f, 1f, 4f, 2f, 5f }, back.data<float>().ToArray());
        Assert.Empty(file.Metadata);
    }

    [Fact]
    public void Write_rejects_duplicate_reserved_and_unsupported_tensors()
    {
        using var scope = NewDisposeScope();
        var x = zeros(2);
        Assert.Throws<ArgumentException>(() => Safetensors.Write([("a", x), ("a", x)]));
        Assert.Throws<ArgumentException>(() => Safetensors.Write([(Safetensors.MetadataKey, x)]));
        Assert.Throws<ArgumentException>(() => Safetensors.Write([("", x)]));
        Assert.Throws<NotSupportedException>(() => Safetensors.Write([("c", zeros(2, dtype: ScalarType.ComplexFloat32))]));
    }

    /// <summary>A file from raw header JSON (padded as a writer would) and <paramref name="dataBytes"/> zero bytes.</summary>
    private static byte[] Raw(string json, int dataBytes, int? declaredLength = null)
    {
        var header = Encoding.UTF8.GetBytes(json);
        int padded = (header.Length + 7) / 8 * 8;
        var file = new byte[8 + padded + dataBytes];
        BinaryPrimitives.WriteUInt64LittleEndian(file, (ulong)(declaredLength ?? padded));
        header.CopyTo(file, 8);
        file.AsSpan(8 + header.Length, padded - header.Length).Fill((byte)' ');
        return file;
    }

    private static void Rejects(byte[] file, string expected)
    {
        var e = Assert.Throws<SafetensorsFormatException>(() => Safetensors.Read(file));
        Assert.Contains(expected, e.Message);
    }

    [Fact]
    public void A_well_formed_raw_file_reads()
    {
        var file = Safetensors.Read(Raw("""{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[],"data_offsets":[8,9]}}""", 9));
        Assert.Equal(["a", "b"], file.Entries.Select(e => e.Name));
        Assert.Equal(8, file.Bytes("a").Length);
    }

    [Fact]
    public void Rejects_a_file_shorter_than_the_length_field() => Rejects(new byte[5], "shorter than the 8-byte header length");

    [Fact]
    public void Rejects_a_header_length_beyond_the_file()
    {
        Rejects(Raw("""{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}""", 1, declaredLength: 4096), "runs past the end of the file");
        var huge = new byte[16];
        BinaryPrimitives.WriteUInt64LittleEndian(huge, ulong.MaxValue);
        Rejects(huge, "runs past the end of the file");
    }

    [Theory]
    [InlineData("""{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}""")]   // unterminated
    [InlineData("""{"a": }""")]
    [InlineData("""{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}} x""")]
    public void Rejects_bad_json(string json) => Rejects(Raw(json, 1), "not valid JSON");

    [Fact]
    public void Rejects_a_header_that_is_not_an_object()
    {
        Rejects(Raw("""[1, 2]""", 0), "not a JSON object");
        Rejects(Raw(" {}", 0), "not a JSON object");
        Rejects(new byte[8], "not a JSON object"); // N = 0
    }

    [Fact]
    public void Rejects_invalid_utf8_in_the_header()
    {
        var file = Raw("""{"ab":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}""", 1);
        file[10] = 0xFF; // inside the name "ab"
        Rejects(file, "not valid UTF-8");
    }

    [Fact]
    public void Rejects_overlapping_offsets()
        => Rejects(Raw("""{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}""", 8), "overlaps");

    [Fact]
    public void Rejects_offsets_past_the_data_section()
        => Rejects(Raw("""{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}""", 4), "run past the data section");

    [Fact]
    public void Rejects_a_gap_between_tensors()
        => Rejects(Raw("""{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}""", 12), "belong to no tensor");

    [Fact]
    public void Rejects_trailing_bytes_no_tensor_covers()
        => Rejects(Raw("""{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}""", 5), "tensors cover 4");

    [Fact]
    public void Rejects_offsets_that_end_before_they_begin()
        => Rejects(Raw("""{"a":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}}""", 4), "end before they begin");

    [Theory]
    [InlineData("""{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}""", 8)]
    [InlineData("""{"a":{"dtype":"F64","shape":[2,2],"data_offsets":[0,16]}}""", 16)]
    [InlineData("""{"a":{"dtype":"BF16","shape":[],"data_offsets":[0,4]}}""", 4)]
    public void Rejects_a_byte_count_that_is_not_dtype_times_shape(string json, int data) => Rejects(Raw(json, data), "needs");

    [Fact]
    public void Rejects_a_shape_whose_size_overflows()
        => Rejects(Raw("""{"a":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,4]}}""", 4), "too large");

    [Theory]
    [InlineData("F8_E4M3")]
    [InlineData("f32")]
    [InlineData("U64")]
    [InlineData("")]
    public void Rejects_an_unknown_dtype(string dtype)
        => Rejects(Raw($$$"""{"a":{"dtype":"{{{dtype}}}","shape":[1],"data_offsets":[0,1]}}""", 1), "unknown dtype");

    [Theory]
    [InlineData("""{"a":{"shape":[1],"data_offsets":[0,1]}}""", "no dtype")]
    [InlineData("""{"a":{"dtype":"U8","data_offsets":[0,1]}}""", "no shape")]
    [InlineData("""{"a":{"dtype":"U8","shape":[1]}}""", "no data_offsets")]
    [InlineData("""{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"extra":1}}""", "unknown field 'extra'")]
    [InlineData("""{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}""", "not a non-negative integer")]
    [InlineData("""{"a":{"dtype":"U8","shape":[1.5],"data_offsets":[0,1]}}""", "not a non-negative integer")]
    [InlineData("""{"a":{"dtype":"U8","shape":[1],"data_offsets":[0]}}""", "not 2")]
    [InlineData("""{"a":{"dtype":"U8","shape":1,"data_offsets":[0,1]}}""", "not an array")]
    [InlineData("""{"a":{"dtype":7,"shape":[1],"data_offsets":[0,1]}}""", "dtype is not a string")]
    [InlineData("""{"a":[1]}""", "not an object")]
    [InlineData("""{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}""", "twice")]
    [InlineData("""{"__metadata__":{"k":1},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}""", "not a string")]
    [InlineData("""{"__metadata__":[],"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}""", "not an object of strings")]
    public void Rejects_malformed_entries(string json, string expected)
    {
        // Duplicate keys may already fail as JSON in some runtimes; either way it is a format error.
        var e = Assert.Throws<SafetensorsFormatException>(() => Safetensors.Read(Raw(json, 1)));
        Assert.True(e.Message.Contains(expected, StringComparison.Ordinal) || e.Message.Contains("JSON", StringComparison.Ordinal), e.Message);
    }

    private const string IndependentReader = """
        import json, struct, sys
        import numpy as np
        data = open(sys.argv[1], 'rb').read()
        (n,) = struct.unpack('<Q', data[:8])
        assert n % 8 == 0, 'header not padded to 8'
        header = json.loads(data[8:8 + n].decode('utf-8'))
        meta = header.pop('__metadata__', {})
        base = 8 + n
        spans = sorted(e['data_offsets'] for e in header.values())
        pos = 0
        for b, e in spans:
            assert b == pos, 'offsets do not tile the data'
            pos = e
        assert base + pos == len(data), 'trailing bytes'
        kinds = {'F64': '<f8', 'F32': '<f4', 'F16': '<f2', 'I64': '<i8', 'I32': '<i4', 'I16': '<i2',
                 'I8': 'i1', 'U8': 'u1', 'BOOL': '?'}
        out = {'metadata': meta, 'tensors': {}}
        for name, e in header.items():
            b, end = e['data_offsets']
            raw = data[base + b: base + end]
            if e['dtype'] == 'BF16':
                a = (np.frombuffer(raw, dtype='<u2').astype(np.uint32) << 16).view(np.float32)
            else:
                a = np.frombuffer(raw, dtype=kinds[e['dtype']])
            a = a.reshape(e['shape'])
            values = [int(v) for v in a.ravel()] if e['dtype'][0] in 'IU' else [float(v) for v in a.astype(np.float64).ravel()]
            out['tensors'][name] = {'dtype': e['dtype'], 'shape': list(a.shape), 'values': values}
        print(json.dumps(out))
        """;

    [PythonNumpyFact]
    public void An_independent_python_numpy_reader_reads_what_we_write()
    {
        using var scope = NewDisposeScope();
        var sample = Sample();
        var path = Path.Combine(TestSupport.TempDir(), "sample.safetensors");
        File.WriteAllBytes(path, Safetensors.Write(sample, Meta()));

        using var doc = JsonDocument.Parse(PythonNumpy.Run(IndependentReader, path));
        var metadata = doc.RootElement.GetProperty("metadata").EnumerateObject().ToDictionary(p => p.Name, p => p.Value.GetString()!);
        Assert.Equal(Meta(), metadata);
        var tensors = doc.RootElement.GetProperty("tensors");
        Assert.Equal(sample.Count, tensors.EnumerateObject().Count());
        foreach (var (name, value) in sample)
        {
            var t = tensors.GetProperty(name);
            Assert.Equal(Safetensors.DTypeOf(value.dtype), t.GetProperty("dtype").GetString());
            Assert.Equal(value.shape, t.GetProperty("shape").EnumerateArray().Select(v => v.GetInt64()));
            var values = t.GetProperty("values").EnumerateArray().ToList();
            var flat = value.reshape(-1);
            if (value.dtype is ScalarType.Int64 or ScalarType.Int32 or ScalarType.Int16 or ScalarType.Int8 or ScalarType.Byte)
                Assert.Equal(flat.to(ScalarType.Int64).data<long>().ToArray(), values.Select(v => v.GetInt64()));
            else
                Assert.Equal(flat.to(ScalarType.Float64).data<double>().ToArray(), values.Select(v => v.GetDouble()));
        }
    }

    private const string IndependentWriter = """
        import json, struct, sys
        import numpy as np
        tensors = {
            'z_f32': np.arange(6, dtype='<f4').reshape(2, 3) / np.float32(7),
            'a_i64': np.array([[-5], [2 ** 40]], dtype='<i8'),
            'm_u8': np.array([1, 2, 3], dtype='u1'),
            'b_f64': np.array(np.pi, dtype='<f8'),
        }
        codes = {'<f4': 'F32', '<i8': 'I64', '|u1': 'U8', '<f8': 'F64'}
        header, blobs, offset = {'__metadata__': {'writer': 'numpy'}}, [], 0
        for name in ['z_f32', 'b_f64', 'm_u8', 'a_i64']:  # data deliberately not in name order
            raw = tensors[name].tobytes()
            header[name] = {'dtype': codes[tensors[name].dtype.str], 'shape': list(tensors[name].shape),
                            'data_offsets': [offset, offset + len(raw)]}
            offset += len(raw)
            blobs.append(raw)
        h = json.dumps(header).encode('utf-8')
        h += b' ' * (-len(h) % 8)
        open(sys.argv[1], 'wb').write(struct.pack('<Q', len(h)) + h + b''.join(blobs))
        """;

    [PythonNumpyFact]
    public void We_read_what_an_independent_python_numpy_writer_writes()
    {
        var path = Path.Combine(TestSupport.TempDir(), "numpy.safetensors");
        PythonNumpy.Run(IndependentWriter, path);
        var file = Safetensors.Read(File.ReadAllBytes(path));
        Assert.Equal(["a_i64", "b_f64", "m_u8", "z_f32"], file.Entries.Select(e => e.Name));
        Assert.Equal("numpy", file.Metadata["writer"]);
        using var z = file.ToTensor("z_f32");
        using var a = file.ToTensor("a_i64");
        using var m = file.ToTensor("m_u8");
        using var b = file.ToTensor("b_f64");
        Assert.Equal(new long[] { 2, 3 }, z.shape);
        Assert.Equal(Enumerable.Range(0, 6).Select(i => i / 7f), z.data<float>().ToArray());
        Assert.Equal(new long[] { 2, 1 }, a.shape);
        Assert.Equal(new[] { -5L, 1L << 40 }, a.data<long>().ToArray());
        Assert.Equal(new byte[] { 1, 2, 3 }, m.data<byte>().ToArray());
        Assert.Empty(b.shape);
        Assert.Equal(Math.PI, b.item<double>());
    }
}
