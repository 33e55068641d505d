namespace ElasticMoE.Runtime.Protocol;

/// <summary>
/// Marks every message ElasticMoE sends between actors. The serialization config binds this interface to
/// <see cref="Serialization.MessagePackSerializer"/>, so a message that forgets the marker shows up as a
/// serializer error in tests rather than quietly travelling through a reflection-based fallback serializer.
/// </summary>
/// <remarks>
/// Implementations are sealed records or classes annotated with <c>[MessagePackObject]</c> and explicit
/// <c>[Key(n)]</c> indices (keys are the wire format: append new ones, never renumber), and usually a
/// <see cref="ManifestAttribute"/> so that renaming or moving the type does not change the wire.
/// </remarks>
public interface IElasticMoEMessage;
