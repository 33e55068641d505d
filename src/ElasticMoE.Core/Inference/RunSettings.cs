using System.Globalization;
using System.Reflection;
using ElasticMoE.Configuration;

namespace ElasticMoE.Inference;

/// <summary>
/// What a run fingerprint (<see cref="Training.TrainingState.RunFingerprint"/>, kept in every checkpoint's manifest and
/// in an exported model's metadata) says about the run: the whole model, the seed, the data, and the train options
/// that nodes compute with.
/// </summary>
/// <remarks>
/// Why read it back rather than ask for the config: a checkpoint or an exported file must be usable on its own, by
/// someone who has neither the HOCON nor the <c>--set</c>s it was trained with. The fingerprint names every field of
/// <see cref="ModelOptions"/> (it is built from the records' constructors), so the model is rebuilt the same way:
/// by constructor parameter name, a field added to the records is read back without anyone remembering to add it here.
/// </remarks>
public sealed class RunSettings
{
    private readonly Dictionary<string, string> _fields;

    private RunSettings(string fingerprint, Dictionary<string, string> fields)
    {
        Fingerprint = fingerprint;
        _fields = fields;
        Model = (ModelOptions)Build(typeof(ModelOptions), "model");
        Seed = long.Parse(Field("seed"), CultureInfo.InvariantCulture);
        DataFingerprint = Field("data");
    }

    /// <summary>The fingerprint as written.</summary>
    public string Fingerprint { get; }

    public ModelOptions Model { get; }
    public long Seed { get; }

    /// <summary>The corpus's <see cref="Data.TextCorpus.Fingerprint"/>: which bytes, split where.</summary>
    public string DataFingerprint { get; }

    /// <summary>A train option by its record field name (<c>MicroBatch</c>, <c>EvalBatches</c>, …), for those nodes compute with.</summary>
    public int TrainInt(string field) => int.Parse(Field("train." + field), CultureInfo.InvariantCulture);

    /// <exception cref="InvalidDataException">Not a run fingerprint, or one that lacks a field of today's model.</exception>
    public static RunSettings Parse(string fingerprint)
    {
        ArgumentNullException.ThrowIfNull(fingerprint);
        var fields = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var part in fingerprint.Split(';'))
        {
            var kv = part.Split('=', 2);
            if (kv.Length == 2) fields[kv[0]] = kv[1];
        }
        try
        {
            return new RunSettings(fingerprint, fields);
        }
        catch (Exception e) when (e is FormatException or OverflowException or ArgumentException)
        {
            throw new InvalidDataException($"the run fingerprint does not describe a model: {e.Message}");
        }
    }

    private string Field(string key) => _fields.TryGetValue(key, out var v) ? v
        : throw new InvalidDataException($"the run fingerprint has no '{key}' (written by another version of ElasticMoE?)");

    // The inverse of TrainingState's AppendFields: one constructor argument per "prefix.Parameter" field.
    private object Build(Type type, string prefix)
    {
        var ctor = type.GetConstructors().Single(c => !(c.GetParameters() is [var only] && only.ParameterType == type));
        var args = ctor.GetParameters().Select(p => Value(p, $"{prefix}.{p.Name}")).ToArray();
        return ctor.Invoke(args);
    }

    private object? Value(ParameterInfo p, string key)
    {
        var t = p.ParameterType;
        if (t == typeof(MoEOptions)) return Build(t, key);
        if (!_fields.ContainsKey(key) && p.HasDefaultValue) return p.DefaultValue;
        var s = Field(key);
        if (t == typeof(int)) return int.Parse(s, CultureInfo.InvariantCulture);
        if (t == typeof(long)) return long.Parse(s, CultureInfo.InvariantCulture);
        if (t == typeof(double)) return double.Parse(s, NumberStyles.Float, CultureInfo.InvariantCulture);
        if (t == typeof(string)) return s;
        if (t.IsEnum) return Enum.Parse(t, s);
        throw new InvalidDataException($"cannot read '{key}' of type {t.Name} from a run fingerprint");
    }
}
