using ElasticMoE.Planning;

namespace ElasticMoE.Runtime.Coordination;

/// <summary>
/// Step-time outliers for `diagnose`: among the workers' compute times of the latest step they all reported, a worker
/// slower than <see cref="Factor"/> times the median of the others (and by more than <see cref="FloorSeconds"/>) is slow.
/// Against the others' median, not everyone's, so that with two or three workers one slow worker cannot set the bar
/// it is measured against.
/// </summary>
public static class StepOutliers
{
    public const double Factor = 2;
    public const double FloorSeconds = 0.05;

    /// <param name="computed">Per worker: the step of its last report and its compute seconds then.</param>
    /// <returns>The slow workers and why, in words.</returns>
    public static Dictionary<WorkerId, string> Find(IReadOnlyList<(WorkerId Worker, long Step, double Seconds)> computed)
    {
        var slow = new Dictionary<WorkerId, string>();
        if (computed.Count < 2) return slow;
        long step = computed.Max(c => c.Step);
        var latest = computed.Where(c => c.Step == step).ToList();
        foreach (var (id, _, seconds) in latest)
        {
            var others = latest.Where(c => c.Worker != id).Select(c => c.Seconds).Order().ToList();
            if (others.Count == 0) continue;
            double median = others.Count % 2 == 1 ? others[others.Count / 2] : (others[others.Count / 2 - 1] + others[others.Count / 2]) / 2;
            if (seconds > Factor * median && seconds - median > FloorSeconds)
                slow[id] = string.Create(System.Globalization.CultureInfo.InvariantCulture,
                    $"worker {id.Device} computed step {step + 1} in {seconds:F3} s, {seconds / Math.Max(median, 1e-9):F1}x the others' median {median:F3} s");
        }
        return slow;
    }
}
