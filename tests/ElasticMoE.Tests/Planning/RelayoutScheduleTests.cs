using ElasticMoE.Planning;

namespace ElasticMoE.Tests.Planning;

public class RelayoutScheduleTests
{
    [Fact]
    public void The_issue_schedule_parses_to_steps_workers_and_pipeline_degrees()
    {
        var points = RelayoutSchedule.Parse("10=4x2,20=4x4,30=2x1,40=3x1");
        Assert.Equal(new[]
        {
            new RelayoutPoint(10, 4, 2),
            new RelayoutPoint(20, 4, 4),
            new RelayoutPoint(30, 2, 1),
            new RelayoutPoint(40, 3, 1),
        }, points);
        Assert.Equal(new[] { 2, 1, 2, 3 }, points.Select(p => p.Dp));
        Assert.Equal("10=4x2,20=4x4,30=2x1,40=3x1", string.Join(",", points));
    }

    [Theory]
    [InlineData("1=1x1", 1, 1, 1)]
    [InlineData(" 5 = 6X3 ", 5, 6, 3)]
    [InlineData("10000000000=128x64", 10_000_000_000L, 128, 64)]
    [InlineData("10=4096x8", 10, 4096, 8)]
    public void Single_points_parse_with_spaces_and_either_x(string text, long step, int workers, int pp)
        => Assert.Equal(new RelayoutPoint(step, workers, pp), Assert.Single(RelayoutSchedule.Parse(text)));

    [Theory]
    [InlineData("", "empty schedule")]
    [InlineData("   ", "empty schedule")]
    [InlineData("10=4x2,", "empty entry")]
    [InlineData(",10=4x2", "empty entry")]
    [InlineData("10", "STEP=WORKERSxPP")]
    [InlineData("10=4x2=3", "STEP=WORKERSxPP")]
    [InlineData("10=4", "layout must be WORKERSxPP")]
    [InlineData("10=4x2x1", "layout must be WORKERSxPP")]
    [InlineData("a=4x2", "step 'a' is not a whole number")]
    [InlineData("10=x2", "workers '' is not a whole number")]
    [InlineData("10=4x", "pp '' is not a whole number")]
    [InlineData("10=+4x2", "workers '+4' is not a whole number")]
    [InlineData("10=4.0x2", "workers '4.0' is not a whole number")]
    [InlineData("99999999999999999999=4x2", "not a whole number")]
    [InlineData("0=4x2", "step must be at least 1")]
    [InlineData("-3=4x2", "step must be at least 1")]
    [InlineData("10=0x1", "workers must be at least 1")]
    [InlineData("10=4097x1", "at most 4096 workers")]
    [InlineData("10=4x0", "pp must be at least 1")]
    [InlineData("10=4x-2", "pp must be at least 1")]
    [InlineData("10=4x3", "pp 3 must divide workers 4")]
    [InlineData("10=4x2,10=2x1", "strictly increasing")]
    [InlineData("20=4x2,10=2x1", "strictly increasing (previous entry is at step 20)")]
    public void Bad_schedules_are_refused_with_the_reason(string text, string reason)
    {
        var ex = Assert.Throws<FormatException>(() => RelayoutSchedule.Parse(text));
        Assert.Contains(reason, ex.Message);
        Assert.StartsWith("--relayout", ex.Message);
    }
}
