namespace ElasticMoE.Runtime.Protocol;

/// <summary>
/// The short, stable name a message type travels under. Without it the type's full name is used, which
/// changes when the type is renamed or moved and costs bytes in every message.
/// </summary>
[AttributeUsage(AttributeTargets.Class | AttributeTargets.Struct, Inherited = false)]
public sealed class ManifestAttribute : Attribute
{
    public ManifestAttribute(string manifest)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(manifest);
        Manifest = manifest;
    }

    public string Manifest { get; }
}
