namespace ElasticMoE.Runtime.DataPlane;

/// <summary>
/// A fence raised with <see cref="DataPlaneNode.Fence"/>: while it is up, frames of the tags it covers are
/// dropped on arrival and receives of them fail. Dispose it to lift it.
/// </summary>
/// <remarks>
/// A handle rather than a bare predicate so that whoever raised a fence can lift exactly that one: several
/// aborted attempts may be fenced at once, and lifting one must not reopen another.
/// </remarks>
public sealed class TagFence : IDisposable
{
    private readonly TagMailboxes _mailboxes;
    private int _lifted;

    internal TagFence(TagMailboxes mailboxes, long id, int droppedWhenRaised)
    {
        _mailboxes = mailboxes;
        Id = id;
        DroppedWhenRaised = droppedWhenRaised;
    }

    /// <summary>Unique per node, increasing.</summary>
    public long Id { get; }

    /// <summary>Frames that were buffered when the fence went up and were dropped then.</summary>
    public int DroppedWhenRaised { get; }

    public bool IsLifted => Volatile.Read(ref _lifted) != 0;

    /// <summary>Lifts the fence: from now on its tags are delivered again. Idempotent.</summary>
    public void Dispose()
    {
        if (Interlocked.Exchange(ref _lifted, 1) == 0) _mailboxes.RemoveFence(Id);
    }

    public override string ToString() => $"TagFence({Id}{(IsLifted ? ", lifted" : "")})";
}
