using System.Security.Cryptography;
using ElasticMoE.Data;

namespace ElasticMoE.Tests.Data;

public class TextCorpusFingerprintTests
{
    private static readonly byte[] Bytes = Enumerable.Range(0, 1000).Select(i => (byte)(i * 7)).ToArray();

    [Fact]
    public void Is_lower_case_hex_sha256_and_the_same_for_the_same_bytes_under_any_name()
    {
        var a = TextCorpus.FromBytes("a.txt", Bytes, 0.1, 16);
        var b = TextCorpus.FromBytes("b.txt", Bytes.ToArray(), 0.1, 16);
        Assert.Matches("^[0-9a-f]{64}$", a.Fingerprint);
        Assert.Equal(a.Fingerprint, b.Fingerprint);
        Assert.Same(a.Fingerprint, a.Fingerprint); // computed once
    }

    [Fact]
    public void Hashes_each_part_with_its_length()
    {
        var c = TextCorpus.FromBytes("c", Bytes, 0.1, 16);
        var expected = SHA256.HashData([
            .. BitConverter.GetBytes((long)c.Train.Length), .. c.Train,
            .. BitConverter.GetBytes((long)c.Validation.Length), .. c.Validation]);
        Assert.Equal(Convert.ToHexStringLower(expected), c.Fingerprint);
    }

    [Fact]
    public void Changes_with_one_byte_or_with_the_validation_split()
    {
        var baseline = TextCorpus.FromBytes("c", Bytes, 0.1, 16).Fingerprint;
        var edited = Bytes.ToArray();
        edited[500] ^= 1;
        Assert.NotEqual(baseline, TextCorpus.FromBytes("c", edited, 0.1, 16).Fingerprint);
        // Same bytes, split elsewhere: the concatenation is equal, the fingerprint must not be.
        Assert.NotEqual(baseline, TextCorpus.FromBytes("c", Bytes, 0.2, 16).Fingerprint);
    }

    [Fact]
    public void The_embedded_default_corpus_has_a_stable_fingerprint()
    {
        var a = TextCorpus.Default(0.1, 128).Fingerprint;
        Assert.Equal(a, TextCorpus.Default(0.1, 128).Fingerprint);
    }
}
