using ElasticMoE.Configuration;
using ElasticMoE.Data;
using ElasticMoE.Training;

namespace ElasticMoE.Tests.Data;

public class TokenizerTests
{
    [Theory]
    [InlineData("gpt2", 50257, "<|endoftext|>")]
    [InlineData("cl100k", 100277, "<|endofprompt|>")]
    [InlineData("o200k", 200019, "<|endofprompt|>")]
    public void A_BPE_tokenizer_round_trips_text_and_its_last_id_is_its_last_special_token(string name, int vocab, string last)
    {
        var t = Tokenizers.For(name);
        Assert.Equal(name, t.Name);
        Assert.Equal(vocab, t.VocabSize);
        Assert.Equal(vocab, Tokenizers.VocabSizeOf(name));
        const string text = "ROMEO:\nBut, soft! what light through yonder window breaks? é€ 🙂";
        var ids = t.Encode(text);
        Assert.True(ids.Length < text.Length, $"{ids.Length} tokens for {text.Length} chars: BPE merges");
        Assert.All(ids, id => Assert.InRange(id, 0, vocab - 1));
        Assert.Equal(text, t.Decode(ids));
        Assert.Equal(ids, t.Encode(System.Text.Encoding.UTF8.GetBytes(text)));
        Assert.Equal(System.Text.Encoding.UTF8.GetByteCount(text), t.ByteCount(ids));
        Assert.Equal(last, t.Decode([vocab - 1]));
    }

    [Fact]
    public void The_vocabulary_follows_the_tokenizer_and_a_bad_tokenizer_or_size_names_its_key()
    {
        Assert.Equal(256, ConfigLoader.Load().Model.VocabSize);
        var gpt2 = ConfigLoader.Load(null, [new("data.tokenizer", "gpt2")]);
        Assert.Equal(50257, gpt2.Model.VocabSize);
        Assert.Equal("gpt2", gpt2.Model.Tokenizer);
        Assert.Equal(50304, ConfigLoader.Load(null, [new("data.tokenizer", "gpt2"), new("model.vocab-size", "50304")]).Model.VocabSize);
        var unknown = Assert.Throws<ConfigException>(() => ConfigLoader.Load(null, [new("data.tokenizer", "sentencepiece")]));
        Assert.Contains("elasticmoe.data.tokenizer", unknown.Message);
        var small = Assert.Throws<ConfigException>(() => ConfigLoader.Load(null, [new("data.tokenizer", "gpt2"), new("model.vocab-size", "256")]));
        Assert.Contains("elasticmoe.model.vocab-size", small.Message);
    }

    [Fact]
    public void A_BPE_corpus_splits_by_tokens_and_its_fingerprint_differs_from_the_bytes_one()
    {
        var gpt2 = Tokenizers.For("gpt2");
        var text = string.Concat(Enumerable.Repeat("alice: hello bob, have you seen the fox?\n", 200));
        var bpe = TextCorpus.FromText("t", text, 0.1, 16, gpt2);
        var bytes = TextCorpus.FromText("t", text, 0.1, 16);
        long total = gpt2.Encode(text).Length;
        Assert.Equal(total, bpe.TrainLength + bpe.ValidationLength);
        Assert.Equal((long)(total * 0.1), bpe.ValidationLength);
        Assert.Equal(gpt2.Encode(text)[0], bpe.TrainToken(0));
        Assert.NotEqual(bytes.Fingerprint, bpe.Fingerprint);
        Assert.Equal(bpe.Fingerprint, TextCorpus.FromText("u", text, 0.1, 16, gpt2).Fingerprint);
        // The bytes corpus is unchanged by the tokenizer work: its fingerprint is of the bytes alone.
        Assert.Equal(text.Length, bytes.TrainLength + bytes.ValidationLength);
        var sampler = new BatchSampler(bpe, 1, 16);
        var (x, y) = sampler.TrainBatch(0, 0, 2);
        Assert.Equal([2L, 16L], x.shape);
        Assert.InRange(x.max().item<long>(), 0, gpt2.VocabSize - 1);
        x.Dispose();
        y.Dispose();
    }

    [Fact]
    public void The_run_fingerprint_names_the_tokenizer()
    {
        var bytes = ConfigLoader.Load();
        var gpt2 = ConfigLoader.Load(null, [new("data.tokenizer", "gpt2")]);
        var diff = TrainingState.RunFingerprintDifferences(TrainingState.RunFingerprint(bytes, "d"), TrainingState.RunFingerprint(gpt2, "d"));
        Assert.Contains("model.Tokenizer: bytes vs gpt2", diff);
        Assert.Contains("model.VocabSize: 256 vs 50257", diff);
    }
}
