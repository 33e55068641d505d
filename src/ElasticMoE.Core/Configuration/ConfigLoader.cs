using System.Reflection;
using Akka.Configuration;
using Hocon = Akka.Configuration.Config;

namespace ElasticMoE.Configuration;

/// <summary>
/// Builds a run's configuration: the embedded reference (hocon/elasticmoe.conf), then an optional user
/// file, then command-line overrides, each checked so that only keys of the reference can be set.
/// </summary>
public static class ConfigLoader
{
    private const string ReferenceResource = "ElasticMoE.reference.conf";
    private static readonly Lazy<string> ReferenceText = new(() =>
    {
        using var s = typeof(ConfigLoader).Assembly.GetManifestResourceStream(ReferenceResource)
            ?? throw new InvalidOperationException($"embedded resource {ReferenceResource} is missing");
        using var r = new StreamReader(s);
        return r.ReadToEnd();
    });

    /// <summary>The reference configuration with every key and its default.</summary>
    public static Hocon Reference => ConfigurationFactory.ParseString(ReferenceText.Value);

    /// <summary>
    /// Loads the configuration. <paramref name="overrides"/> are <c>key = value</c> pairs relative to
    /// <c>elasticmoe</c> (e.g. <c>("train.steps", "100")</c>), applied last.
    /// </summary>
    public static ElasticMoEConfig Load(string? userFile = null, IEnumerable<KeyValuePair<string, string>>? overrides = null)
        => ElasticMoEConfig.FromHocon(LoadHocon(userFile, overrides));

    public static Hocon LoadHocon(string? userFile = null, IEnumerable<KeyValuePair<string, string>>? overrides = null)
    {
        var reference = Reference;
        var known = LeafKeys(reference.GetConfig("elasticmoe"), "elasticmoe").ToHashSet(StringComparer.Ordinal);
        var result = reference;

        if (!string.IsNullOrEmpty(userFile))
        {
            if (!File.Exists(userFile))
                throw new ConfigException($"config file not found: {userFile}");
            Hocon user;
            try { user = ConfigurationFactory.ParseString(File.ReadAllText(userFile)); }
            catch (Exception ex) when (ex is not ConfigException)
            {
                throw new ConfigException($"{userFile}: cannot parse HOCON: {ex.Message}");
            }
            CheckKnown(user, known, userFile);
            result = user.WithFallback(result);
            // Type and range errors found now are the file's, so say which file.
            try { ElasticMoEConfig.FromHocon(result); }
            catch (ConfigException ex) { throw new ConfigException($"{userFile}: {ex.Message}"); }
        }

        if (overrides is not null)
        {
            foreach (var (key, value) in overrides)
            {
                var path = "elasticmoe." + key;
                if (!known.Contains(path))
                    throw new ConfigException($"unknown config key '{path}' (command-line override){Suggest(path, known)}");
                Hocon o;
                try { o = ConfigurationFactory.ParseString($"{path} = {Quote(value)}"); }
                catch (Exception ex) { throw new ConfigException($"bad value for '{path}' (command-line override): {ex.Message}"); }
                result = o.WithFallback(result);
            }
        }

        return result;
    }

    /// <summary>Throws naming the first key under <c>elasticmoe</c> in <paramref name="user"/> that the reference lacks.</summary>
    public static void CheckKnown(Hocon user, ISet<string> known, string source)
    {
        if (!user.HasPath("elasticmoe")) return;
        foreach (var key in LeafKeys(user.GetConfig("elasticmoe"), "elasticmoe"))
        {
            if (!known.Contains(key))
                throw new ConfigException($"{source}: unknown config key '{key}'{Suggest(key, known)}");
        }
    }

    /// <summary>Full paths of every non-object value under <paramref name="config"/>.</summary>
    public static IEnumerable<string> LeafKeys(Hocon config, string prefix)
    {
        var root = config.Root;
        if (!root.IsObject()) yield break;
        foreach (var (name, value) in root.GetObject().Items)
        {
            var path = $"{prefix}.{name}";
            if (value.IsObject())
            {
                foreach (var k in LeafKeys(config.GetConfig(name), path)) yield return k;
            }
            else yield return path;
        }
    }

    // A value that parses as a HOCON number or boolean stays one; anything else is quoted as a string.
    private static string Quote(string value)
    {
        if (double.TryParse(value, System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture, out _)
            || value is "true" or "false" || value.StartsWith('['))
            return value;
        return "\"" + value.Replace("\\", "\\\\").Replace("\"", "\\\"") + "\"";
    }

    private static string Suggest(string key, IEnumerable<string> known)
    {
        var best = known.Select(k => (k, d: Levenshtein(k, key))).OrderBy(t => t.d).FirstOrDefault();
        return best.k is not null && best.d <= 3 ? $" (did you mean '{best.k}'?)" : "";
    }

    private static int Levenshtein(string a, string b)
    {
        var prev = new int[b.Length + 1];
        var cur = new int[b.Length + 1];
        for (int j = 0; j <= b.Length; j++) prev[j] = j;
        for (int i = 1; i <= a.Length; i++)
        {
            cur[0] = i;
            for (int j = 1; j <= b.Length; j++)
                cur[j] = Math.Min(Math.Min(cur[j - 1] + 1, prev[j] + 1), prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1));
            (prev, cur) = (cur, prev);
        }
        return prev[b.Length];
    }
}
