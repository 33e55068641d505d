using System.Globalization;
using ElasticMoE.Configuration;

namespace ElasticMoE.State;

/// <summary>What a state unit holds.</summary>
public enum UnitKind
{
    /// <summary>The byte embedding (first pipeline stage).</summary>
    Embedding = 0,
    /// <summary>The dense parameters of one block: norms, attention, router weights, shared experts or dense FFN.</summary>
    Block = 1,
    /// <summary>Final norm and output head (last pipeline stage).</summary>
    Head = 2,
    /// <summary>One routed expert of one MoE block.</summary>
    Expert = 3,
    /// <summary>The aux-loss-free router bias of one MoE block (a buffer: no moments).</summary>
    RouterBias = 4,
}

/// <summary>
/// The name of one movable piece of training state. Units are the grain of everything that moves or
/// persists: re-plans transfer them, checkpoints write them, the shell inspects them. A stage slice is
/// a contiguous run of block units (plus embedding and head where they belong), so a change of the
/// pipeline degree moves whole blocks and nothing is ever split.
/// </summary>
/// <param name="Block">Block index for Block, Expert and RouterBias; -1 otherwise.</param>
/// <param name="Expert">Routed expert index for Expert; -1 otherwise.</param>
public readonly record struct UnitId(UnitKind Kind, int Block = -1, int Expert = -1) : IComparable<UnitId>
{
    public static UnitId Embedding => new(UnitKind.Embedding);
    public static UnitId Head => new(UnitKind.Head);
    public static UnitId OfBlock(int block) => new(UnitKind.Block, block);
    public static UnitId OfExpert(int block, int expert) => new(UnitKind.Expert, block, expert);
    public static UnitId OfRouterBias(int block) => new(UnitKind.RouterBias, block);

    public int CompareTo(UnitId other)
    {
        int c = ((int)Kind).CompareTo((int)other.Kind);   // not Enum.CompareTo(object): that boxes, and planners compare units millions of times
        if (c != 0) return c;
        c = Block.CompareTo(other.Block);
        return c != 0 ? c : Expert.CompareTo(other.Expert);
    }

    public override string ToString() => Kind switch
    {
        UnitKind.Embedding => "embed",
        UnitKind.Head => "head",
        UnitKind.Block => $"block.{Block}",
        UnitKind.Expert => $"expert.{Block}.{Expert}",
        UnitKind.RouterBias => $"router-bias.{Block}",
        _ => $"unit({(int)Kind},{Block},{Expert})",
    };

    /// <summary>Parses what <see cref="ToString"/> writes; a clear error for anything else.</summary>
    public static UnitId Parse(string text)
    {
        var parts = text.Split('.');
        int Int(string s) => int.TryParse(s, NumberStyles.None, CultureInfo.InvariantCulture, out var v)
            ? v : throw new FormatException($"'{text}' is not a unit name (embed, head, block.B, expert.B.E, router-bias.B)");
        return parts switch
        {
            ["embed"] => Embedding,
            ["head"] => Head,
            ["block", var b] => OfBlock(Int(b)),
            ["expert", var b, var e] => OfExpert(Int(b), Int(e)),
            ["router-bias", var b] => OfRouterBias(Int(b)),
            _ => throw new FormatException($"'{text}' is not a unit name (embed, head, block.B, expert.B.E, router-bias.B)"),
        };
    }
}

/// <summary>
/// Which units a model has and which unit each named tensor of the model belongs to. Names are those of
/// <c>MoETransformer.named_parameters()</c> / <c>named_buffers()</c>: <c>embed.*</c>, <c>blocks.B.*</c>,
/// <c>blocks.B.ffn.experts.E.*</c>, <c>blocks.B.ffn.router.expert_bias</c>, <c>final_norm.*</c>, <c>head.*</c>.
/// </summary>
public static class UnitCatalog
{
    /// <summary>Every unit of the model in canonical order (the order of <see cref="UnitId.CompareTo"/>).</summary>
    public static IReadOnlyList<UnitId> All(ModelOptions model)
    {
        var units = new List<UnitId> { UnitId.Embedding };
        for (int b = 0; b < model.Layers; b++) units.Add(UnitId.OfBlock(b));
        units.Add(UnitId.Head);
        for (int b = model.DenseLayers; b < model.Layers; b++)
            for (int e = 0; e < model.MoE.RoutedExperts; e++) units.Add(UnitId.OfExpert(b, e));
        for (int b = model.DenseLayers; b < model.Layers; b++) units.Add(UnitId.OfRouterBias(b));
        units.Sort();
        return units;
    }

    /// <summary>The units a pipeline stage of blocks [first, end) holds (embedding first stage, head last).</summary>
    public static IEnumerable<UnitId> StageUnits(ModelOptions model, int first, int end)
    {
        if (first == 0) yield return UnitId.Embedding;
        for (int b = first; b < end; b++)
        {
            yield return UnitId.OfBlock(b);
            if (model.IsMoELayer(b)) yield return UnitId.OfRouterBias(b);
        }
        if (end == model.Layers) yield return UnitId.Head;
    }

    /// <summary>The unit a model tensor belongs to, by its name.</summary>
    public static UnitId OfTensor(string name)
    {
        if (name.StartsWith("embed.", StringComparison.Ordinal)) return UnitId.Embedding;
        if (name.StartsWith("final_norm.", StringComparison.Ordinal) || name.StartsWith("head.", StringComparison.Ordinal)) return UnitId.Head;
        if (name.StartsWith("blocks.", StringComparison.Ordinal))
        {
            var parts = name.Split('.');
            int block = int.Parse(parts[1], CultureInfo.InvariantCulture);
            if (parts.Length > 4 && parts[2] == "ffn" && parts[3] == "experts")
                return UnitId.OfExpert(block, int.Parse(parts[4], CultureInfo.InvariantCulture));
            if (name.EndsWith(".ffn.router.expert_bias", StringComparison.Ordinal)) return UnitId.OfRouterBias(block);
            return UnitId.OfBlock(block);
        }
        throw new ArgumentException($"tensor '{name}' belongs to no unit");
    }
}
