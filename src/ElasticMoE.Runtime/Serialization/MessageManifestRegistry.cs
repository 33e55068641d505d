using System.Reflection;
using System.Runtime.Serialization;
using ElasticMoE.Runtime.Protocol;

namespace ElasticMoE.Runtime.Serialization;

/// <summary>
/// Maps message types to manifests and back. Only types found here can be deserialized: a manifest read
/// off the network never names an arbitrary type to instantiate.
/// </summary>
/// <remarks>
/// Found by scanning: every concrete <see cref="IElasticMoEMessage"/> in the loaded assemblies that can
/// contain one (those referencing ElasticMoE.Runtime), plus any ElasticMoE* assembly they reference, loaded
/// on purpose: .NET loads assemblies lazily, and a receiver must know a message type before its own code
/// has ever touched it. Assemblies loaded later are picked up on demand: a sender's type by its own
/// assembly, an unknown manifest by a rescan before it is declared unknown.
/// </remarks>
public sealed class MessageManifestRegistry
{
    private static readonly string RuntimeAssemblyName = typeof(IElasticMoEMessage).Assembly.GetName().Name!;
    private static readonly Lazy<MessageManifestRegistry> SharedInstance = new(CreateShared);

    private readonly object _gate = new();
    private readonly Dictionary<Type, string> _manifests = new();
    private readonly Dictionary<string, Type> _types = new(StringComparer.Ordinal);
    private readonly Dictionary<string, List<Type>> _conflicts = new(StringComparer.Ordinal);
    private readonly HashSet<Assembly> _scanned = new();
    private readonly HashSet<Assembly> _relevant = new();

    /// <summary>The process-wide registry the serializer uses.</summary>
    public static MessageManifestRegistry Shared => SharedInstance.Value;

    private static MessageManifestRegistry CreateShared()
    {
        var registry = new MessageManifestRegistry();
        registry.ScanLoadedAssemblies();
        return registry;
    }

    /// <summary>The manifest a type travels under: its <see cref="ManifestAttribute"/>, else its full name.</summary>
    public static string ManifestOf(Type type) =>
        type.GetCustomAttribute<ManifestAttribute>()?.Manifest ?? type.FullName ?? type.Name;

    public IReadOnlyCollection<Type> MessageTypes
    {
        get { lock (_gate) return _types.Values.ToArray(); }
    }

    /// <summary>Adds a type by hand (one outside the scanned assemblies, or not marked as a message).</summary>
    /// <exception cref="InvalidOperationException">Another type already has its manifest.</exception>
    public void Register(Type type)
    {
        ArgumentNullException.ThrowIfNull(type);
        lock (_gate)
        {
            Add(type);
            ThrowIfConflicts();
        }
    }

    /// <exception cref="SerializationException">The type is unknown, or shares its manifest with another.</exception>
    public string ManifestFor(Type type)
    {
        if (TryManifestFor(type, out var manifest)) return manifest;
        Scan(type.Assembly);
        if (TryManifestFor(type, out manifest)) return manifest;
        throw new SerializationException(
            $"{type.FullName} is not a registered ElasticMoE message: implement {nameof(IElasticMoEMessage)} " +
            $"(in an assembly that references {RuntimeAssemblyName}) or call {nameof(MessageManifestRegistry)}.{nameof(Register)}.");
    }

    private bool TryManifestFor(Type type, out string manifest)
    {
        lock (_gate)
        {
            if (!_manifests.TryGetValue(type, out manifest!)) return false;
            if (_conflicts.ContainsKey(manifest)) throw Ambiguous(manifest);
            return true;
        }
    }

    /// <exception cref="SerializationException">The manifest is unknown or ambiguous.</exception>
    public Type Resolve(string manifest)
    {
        if (TryResolve(manifest, out var type)) return type;
        // The type's assembly may have been loaded since the last scan.
        ScanLoadedAssemblies();
        if (TryResolve(manifest, out type)) return type;
        throw new SerializationException(
            $"Unknown ElasticMoE message manifest '{manifest}': no {nameof(IElasticMoEMessage)} type with that manifest is loaded in this process. " +
            "The sender runs a different version of the protocol, or the message's assembly is missing here.");
    }

    private bool TryResolve(string manifest, out Type type)
    {
        lock (_gate)
        {
            if (_conflicts.ContainsKey(manifest)) throw Ambiguous(manifest);
            return _types.TryGetValue(manifest, out type!);
        }
    }

    /// <summary>Fails when two message types share a manifest: a receiver could not tell them apart.</summary>
    public void ThrowIfConflicts()
    {
        lock (_gate)
        {
            if (_conflicts.Count > 0) throw new InvalidOperationException(ConflictMessage(_conflicts.First().Key));
        }
    }

    public void ScanLoadedAssemblies()
    {
        var pending = new Queue<Assembly>(AppDomain.CurrentDomain.GetAssemblies());
        var seenNames = new HashSet<string>(StringComparer.OrdinalIgnoreCase);
        while (pending.TryDequeue(out var assembly))
        {
            if (!Scan(assembly)) continue;
            foreach (var reference in SafeReferences(assembly))
            {
                if (reference.Name is null || !reference.Name.StartsWith("ElasticMoE", StringComparison.OrdinalIgnoreCase)) continue;
                if (!seenNames.Add(reference.Name)) continue;
                try { pending.Enqueue(Assembly.Load(reference)); }
                catch (Exception ex) when (ex is FileNotFoundException or FileLoadException or BadImageFormatException) { }
            }
        }
    }

    // Returns whether the assembly could hold messages (so its references are worth following).
    private bool Scan(Assembly assembly)
    {
        lock (_gate)
        {
            if (_scanned.Contains(assembly)) return _relevant.Contains(assembly);
            _scanned.Add(assembly);
            if (assembly.IsDynamic) return false;
            var name = assembly.GetName().Name;
            if (name != RuntimeAssemblyName && !SafeReferences(assembly).Any(r => r.Name == RuntimeAssemblyName)) return false;
            _relevant.Add(assembly);
            foreach (var type in SafeTypes(assembly))
            {
                if (type is { IsAbstract: false, IsInterface: false, ContainsGenericParameters: false } && typeof(IElasticMoEMessage).IsAssignableFrom(type))
                    Add(type);
            }
        }
        return true;
    }

    private void Add(Type type)
    {
        if (_manifests.ContainsKey(type)) return;
        var manifest = ManifestOf(type);
        _manifests[type] = manifest;
        if (_types.TryGetValue(manifest, out var existing) && existing != type)
        {
            if (!_conflicts.TryGetValue(manifest, out var list)) _conflicts[manifest] = list = [existing];
            list.Add(type);
            return;
        }
        _types[manifest] = type;
    }

    private SerializationException Ambiguous(string manifest) => new(ConflictMessage(manifest));

    private string ConflictMessage(string manifest) =>
        $"Manifest '{manifest}' is claimed by several message types ({string.Join(", ", _conflicts[manifest].Select(t => t.FullName))}); give each a distinct [Manifest].";

    private static AssemblyName[] SafeReferences(Assembly assembly)
    {
        try { return assembly.GetReferencedAssemblies(); }
        catch (Exception) { return []; }
    }

    private static IEnumerable<Type> SafeTypes(Assembly assembly)
    {
        try { return assembly.GetTypes(); }
        catch (ReflectionTypeLoadException ex) { return ex.Types.Where(t => t is not null)!; }
    }
}
