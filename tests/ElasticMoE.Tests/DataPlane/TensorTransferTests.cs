using ElasticMoE.Native;
using ElasticMoE.Runtime.DataPlane;
using TorchSharp;
using static TorchSharp.torch;

namespace ElasticMoE.Tests.DataPlane;

public sealed class TensorTransferTests
{
    public TensorTransferTests() => LibTorchLoader.EnsureLoaded();

    private static bool Same(Tensor x, Tensor y)
    {
        if (!x.shape.SequenceEqual(y.shape) || x.dtype != y.dtype) return false;
        using var eq = x.eq(y);
        using var all = eq.all();
        return all.item<bool>();
    }

    [Fact]
    public async Task Float_tensor_round_trips_with_shape_and_dtype()
    {
        await using var cluster = new LoopbackCluster(2);
        var (a, b) = (cluster.Nodes[0], cluster.Nodes[1]);
        using var sent = randn(2, 3, 4, generator: new Generator(1));
        await a.SendAsync(b.Endpoint, 1, sent);
        using var frame = await b.ReceiveAsync(1).Within();
        Assert.Equal(ElementType.Float32, frame.ElementType);
        using var received = frame.ToTensor();
        Assert.Equal(new long[] { 2, 3, 4 }, received.shape);
        Assert.True(Same(received, sent));
    }

    [Fact]
    public async Task Views_are_sent_as_their_own_values()
    {
        await using var cluster = new LoopbackCluster(2);
        var (a, b) = (cluster.Nodes[0], cluster.Nodes[1]);
        using var baseTensor = arange(0, 60, dtype: ScalarType.Float32).reshape(6, 10);
        using var transposed = baseTensor.t();            // strided: sent as a dense copy
        using var rows = baseTensor.narrow(0, 2, 3);      // contiguous with a storage offset: sent from storage
        Assert.False(transposed.is_contiguous());
        Assert.True(rows.is_contiguous());

        await a.SendAsync(b.Endpoint, 1, transposed);
        await a.SendAsync(b.Endpoint, 2, rows);
        using var t = (await b.ReceiveAsync(1).Within()).ToTensor();
        using var r = (await b.ReceiveAsync(2).Within()).ToTensor();
        Assert.True(Same(t, transposed));
        Assert.True(Same(r, rows));
        Assert.Equal(20f, r[0, 0].item<float>());
    }

    [Fact]
    public async Task Integer_tensors_keep_their_dtype()
    {
        await using var cluster = new LoopbackCluster(2);
        var (a, b) = (cluster.Nodes[0], cluster.Nodes[1]);
        using var sent = tensor(new long[] { long.MinValue, -1, 0, long.MaxValue });
        await a.SendAsync(b.Endpoint, 1, sent);
        using var frame = await b.ReceiveAsync(1).Within();
        Assert.Equal(ElementType.Int64, frame.ElementType);
        using var received = frame.ToTensor();
        Assert.Equal(ScalarType.Int64, received.dtype);
        Assert.True(Same(received, sent));
    }

    [Fact]
    public async Task Bf16_compression_matches_torchs_own_bfloat16_rounding()
    {
        await using var cluster = new LoopbackCluster(2);
        var (a, b) = (cluster.Nodes[0], cluster.Nodes[1]);
        using var sent = randn(1000, generator: new Generator(2)) * 1e3f;
        await a.SendAsync(b.Endpoint, 1, sent, Compression.BFloat16);
        using var frame = await b.ReceiveAsync(1).Within();
        Assert.True(frame.WasCompressed);
        using var received = frame.ToTensor();
        using var viaTorch = sent.to(ScalarType.BFloat16).to(ScalarType.Float32);
        Assert.True(Same(received, viaTorch));
    }

    [Fact]
    public async Task Frame_copies_into_an_existing_tensor()
    {
        await using var cluster = new LoopbackCluster(2);
        var (a, b) = (cluster.Nodes[0], cluster.Nodes[1]);
        await a.SendAsync(b.Endpoint, 1, new float[] { 1, 2, 3, 4 });
        using var frame = await b.ReceiveAsync(1).Within();
        using var target = zeros(2, 2);
        frame.CopyTo(target);
        Assert.Equal(new float[] { 1, 2, 3, 4 }, target.data<float>().ToArray());
        using var wrong = zeros(5);
        Assert.Throws<ArgumentException>(() => frame.CopyTo(wrong));
    }

    [Fact]
    public async Task Tensor_all_reduce_works_in_place_and_agrees_across_ranks()
    {
        await using var cluster = new LoopbackCluster(3, collectiveOptions: new CollectiveOptions { ChunkBytes = 4096 });
        var tensors = Enumerable.Range(0, 3).Select(r => randn(37, 101, generator: new Generator((ulong)(10 + r)))).ToArray();
        using var expected = tensors[0] + tensors[1] + tensors[2];
        try
        {
            await Task.WhenAll(cluster.Groups.Select((g, r) => g.AllReduceSumAsync(tensors[r], 11))).Within();
            Assert.True(Same(tensors[0], tensors[1]));
            Assert.True(Same(tensors[0], tensors[2]));
            Assert.True(tensors[0].allclose(expected, rtol: 1e-5, atol: 1e-5));
        }
        finally
        {
            foreach (var t in tensors) t.Dispose();
        }
    }

    [Fact]
    public async Task All_reduce_refuses_tensors_it_cannot_update_in_place()
    {
        await using var node = DataPlaneNode.Start();
        var group = new CollectiveGroup(node, [node.Endpoint], 0);
        using var strided = zeros(4, 4).t();
        using var ints = zeros(4, dtype: ScalarType.Int32);
        await Assert.ThrowsAsync<ArgumentException>(() => group.AllReduceSumAsync(strided, 1));
        await Assert.ThrowsAsync<ArgumentException>(() => group.AllReduceSumAsync(ints, 1));
    }
}
