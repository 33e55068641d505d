namespace ElasticMoE.Data;

/// <summary>
/// SplitMix64: a tiny, fast, platform-independent generator. Used wherever a value must be a pure
/// function of integers (seed, step, sequence), never of call order or of which worker asks.
/// </summary>
public struct SplitMix64(ulong state)
{
    private ulong _state = state;

    public ulong Next()
    {
        ulong z = _state += 0x9E3779B97F4A7C15UL;
        return Mix(z);
    }

    public int NextInt(int exclusiveMax) => (int)(Next() % (ulong)exclusiveMax);

    public static ulong Mix(ulong z)
    {
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
    }

    /// <summary>A well-mixed hash of a tuple of integers.</summary>
    public static ulong Hash(ulong a, ulong b, ulong c) =>
        Mix(Mix(Mix(a + 0x9E3779B97F4A7C15UL) ^ (b + 0x632BE59BD9B4E019UL)) ^ (c + 0x85157AF5UL));
}
