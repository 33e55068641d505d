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

    // torch.tensor(float[]) wraps the managed array, which this test keeps alive; a clone lives in
    // libtorch's own allocation, which disposing frees for real.
    private static Tensor Owned(float[] values)
    {
        using var wrapped = tensor(values);
        return wrapped.clone();
    }

    [Fact]
    public async Task A_tensor_disposed_as_soon_as_SendAsync_returns_still_arrives_with_its_original_values()
    {
        // 16 000 floats = 64 000 bytes: below malloc's mmap threshold, so freed storage goes back to the heap
        // and the very next allocations of that size reuse and overwrite it. A send that still read the
        // original's storage after returning would then carry the junk instead.
        const int n = 16_000;
        await using var sender = DataPlaneNode.Start();
        for (var round = 0; round < 8; round++)
        {
            // A fresh receiver each round: the dial to it is asynchronous, so SendAsync returns before the
            // socket has read a byte, which is the case that matters.
            await using var receiver = DataPlaneNode.Start();
            var values = Enumerable.Range(0, n).Select(i => (float)(round * n + i)).ToArray();
            var original = Owned(values);
            var send = sender.SendAsync(receiver.Endpoint, 1, original);
            original.Dispose();
            var junk = Enumerable.Range(0, 16).Select(_ => randn(n)).ToList();
            try
            {
                await send.Within();
                using var frame = await receiver.ReceiveAsync(1).Within();
                Assert.True(frame.AsFloats().SequenceEqual(values), $"round {round}: the frame does not hold the sent values");
            }
            finally
            {
                foreach (var t in junk) t.Dispose();
            }
        }
    }

    [Fact]
    public async Task A_tensor_sent_from_inside_a_dispose_scope_survives_the_scope()
    {
        await using var cluster = new LoopbackCluster(2);
        var (a, b) = (cluster.Nodes[0], cluster.Nodes[1]);
        var values = Enumerable.Range(0, 16_000).Select(i => (float)-i).ToArray();
        Task send;
        using (NewDisposeScope())
        {
            var original = Owned(values); // owned by the scope, freed when it ends
            send = a.SendAsync(b.Endpoint, 1, original);
        }
        var junk = Enumerable.Range(0, 16).Select(_ => randn(16_000)).ToList();
        try
        {
            await send.Within();
            using var frame = await b.ReceiveAsync(1).Within();
            Assert.True(frame.AsFloats().SequenceEqual(values));
        }
        finally
        {
            foreach (var t in junk) t.Dispose();
        }
    }

    [Fact]
    public async Task A_cancelled_tensor_send_sends_nothing_and_the_connection_still_works()
    {
        await using var cluster = new LoopbackCluster(2);
        var (a, b) = (cluster.Nodes[0], cluster.Nodes[1]);
        using var sent = arange(0, 10, dtype: ScalarType.Float32);
        using var cts = new CancellationTokenSource();
        cts.Cancel();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => a.SendAsync(b.Endpoint, 1, sent, cancellationToken: cts.Token));
        await a.SendAsync(b.Endpoint, 2, sent);
        using var frame = await b.ReceiveAsync(2).Within();
        Assert.Equal(10, frame.ElementCount);
        Assert.Equal(0, b.BufferedBytes); // tag 1 never arrived
    }

    [Fact]
    public async Task Sending_a_parameter_that_requires_grad_records_no_autograd_history()
    {
        await using var cluster = new LoopbackCluster(2);
        var (a, b) = (cluster.Nodes[0], cluster.Nodes[1]);
        using var weight = randn(3, 5).requires_grad_(true);
        await a.SendAsync(b.Endpoint, 1, weight);
        using var frame = await b.ReceiveAsync(1).Within();
        using var received = frame.ToTensor();
        using var detached = weight.detach();
        Assert.True(Same(received, detached));
        Assert.Null(weight.grad);
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
