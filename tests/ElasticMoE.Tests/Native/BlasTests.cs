using ElasticMoE.Native;
using TorchSharp;
using static TorchSharp.torch;

namespace ElasticMoE.Tests.Native;

public class BlasTests
{
    [Fact]
    public void Libtorch_on_linux_brings_MKL_so_the_chunked_expert_kernel_runs()
    {
        TestSupport.EnsureTorch();
        // The CPU package (libtorch-cpu-linux-x64) links MKL; without it every CPU run would fall back to the bmm kernel.
        if (OperatingSystem.IsLinux()) Assert.True(Blas.Available, "no sgemm_/dgemm_ in the loaded libtorch_cpu");
    }

    // Row-major C = op(A) op(B) + beta C against libtorch's matmul, every transpose combination, operands and C
    // inside wider rows (lda, ldb, ldc > their widths), beta 0 (C's old values, NaN here, ignored) and beta 1.
    [Theory]
    [InlineData(false, false, 0.0, ScalarType.Float32)]
    [InlineData(false, true, 0.0, ScalarType.Float32)]
    [InlineData(true, false, 0.0, ScalarType.Float32)]
    [InlineData(true, true, 0.0, ScalarType.Float32)]
    [InlineData(false, true, 1.0, ScalarType.Float32)]
    [InlineData(true, false, 1.0, ScalarType.Float64)]
    [InlineData(false, false, 0.0, ScalarType.Float64)]
    public unsafe void Gemm_computes_row_major_products_with_strides_and_beta(bool transA, bool transB, double beta, ScalarType dtype)
    {
        TestSupport.EnsureTorch();
        Assert.True(Blas.Available, "libtorch without MKL here");
        const int m = 37, n = 21, k = 13, pad = 5;
        using var gen = new Generator(17);
        // Stored shapes, each row `pad` elements wider than the operand.
        var aStore = randn(transA ? new long[] { k, m + pad } : new long[] { m, k + pad }, dtype: dtype, generator: gen);
        var bStore = randn(transB ? new long[] { n, k + pad } : new long[] { k, n + pad }, dtype: dtype, generator: gen);
        var cStore = randn(new long[] { m, n + pad }, dtype: dtype, generator: gen);
        var a = transA ? aStore.narrow(1, 0, m).t() : aStore.narrow(1, 0, k);
        var b = transB ? bStore.narrow(1, 0, k).t() : bStore.narrow(1, 0, n);
        var expected = a.matmul(b);
        if (beta == 1) expected = expected + cStore.narrow(1, 0, n);
        else cStore.narrow(1, 0, n).fill_(double.NaN);
        var padding = cStore.narrow(1, n, pad).clone();

        if (dtype == ScalarType.Float32)
            Blas.Gemm(transA, transB, m, n, k, TensorMemory.Pointer<float>(aStore), (int)aStore.shape[1], TensorMemory.Pointer<float>(bStore),
                (int)bStore.shape[1], (float)beta, TensorMemory.Pointer<float>(cStore), (int)cStore.shape[1]);
        else
            Blas.Gemm(transA, transB, m, n, k, TensorMemory.Pointer<double>(aStore), (int)aStore.shape[1], TensorMemory.Pointer<double>(bStore),
                (int)bStore.shape[1], beta, TensorMemory.Pointer<double>(cStore), (int)cStore.shape[1]);

        var c = cStore.narrow(1, 0, n);
        Assert.True(allclose(c, expected, rtol: 1e-5, atol: 1e-5), $"largest difference {(c - expected).abs().max().to(ScalarType.Float64).item<double>():E3}");
        Assert.True(cStore.narrow(1, n, pad).eq(padding).all().item<bool>(), "wrote past the rows' widths");
    }
}
