using System.Globalization;
using System.Text;

namespace ElasticMoE.Cli;

/// <summary>
/// Progress of a long command: on a terminal, one bar redrawn in place with its rate and ETA (lines the command prints
/// meanwhile go through <see cref="Writer"/>, above the bar); elsewhere (a pipe, a file, a log) plain lines, one every
/// tenth of the work or 15 s, so a log keeps a readable record.
/// </summary>
/// <remarks>
/// Escape codes (colour, erasing the line) only where <see cref="TerminalColour"/> allows them: on a terminal without
/// NO_COLOR. On a terminal with NO_COLOR the bar is still redrawn in place, by a carriage return and padding, without a
/// single escape code. Drawn by hand rather than by Spectre.Console's live display: that owns the console while it runs,
/// and train prints a line per step meanwhile, which would tear the display.
/// </remarks>
public sealed class Progress : IDisposable
{
    private const int BarWidth = 24;
    private static readonly TimeSpan RedrawEvery = TimeSpan.FromMilliseconds(100), LineEvery = TimeSpan.FromSeconds(15);

    private readonly TextWriter _output;
    private readonly long _total;
    private readonly string _unit;
    private readonly bool _inPlace, _colour;
    private readonly Func<TimeSpan> _clock;
    private readonly object _gate = new();
    private long _done, _first = -1;
    private TimeSpan _firstAt, _drawnAt = TimeSpan.FromDays(-1);   // "long ago", without overflowing a subtraction
    private long _lineTenth = -1;
    private int _drawnLength;
    private bool _finished;

    public string Label { get; set; }

    /// <summary>Where to print lines while the bar shows (on a terminal, above it; elsewhere the output itself).</summary>
    public TextWriter Writer { get; }

    public Progress(TextWriter output, string label, long total, string unit, bool inPlace, bool colour, Func<TimeSpan>? clock = null)
    {
        _output = output;
        Label = label;
        _total = Math.Max(1, total);
        _unit = unit;
        _inPlace = inPlace;
        _colour = colour && inPlace;
        var started = System.Diagnostics.Stopwatch.StartNew();
        _clock = clock ?? (() => started.Elapsed);
        Writer = inPlace ? new AboveBar(this) : output;
    }

    /// <summary>A bar on this process's terminal stdout, plain lines on anything else.</summary>
    public static Progress Start(TextWriter output, string label, long total, string unit)
        => new(output, label, total, unit, OnTerminal(output), TerminalColour.Enabled(output));

    /// <summary>Whether <paramref name="output"/> is this process's stdout on a terminal (a bar may be redrawn in place).</summary>
    public static bool OnTerminal(TextWriter output) => ReferenceEquals(output, Console.Out) && !Console.IsOutputRedirected;

    /// <summary><paramref name="done"/> of the total so far (thread-safe; drawn at most every 100 ms).</summary>
    public void Report(long done)
    {
        lock (_gate)
        {
            if (_finished) return;
            var now = _clock();
            if (_first < 0) (_first, _firstAt) = (done, now);
            _done = done;
            if (_inPlace)
            {
                if (now - _drawnAt < RedrawEvery) return;
                _drawnAt = now;
                Draw(now);
            }
            else
            {
                long tenth = Math.Min(10, done * 10 / _total);
                if (tenth == _lineTenth && now - _drawnAt < LineEvery) return;
                (_lineTenth, _drawnAt) = (tenth, now);
                _output.WriteLine(Text(now, bar: false));
            }
        }
    }

    /// <summary>The work is complete: the bar at its end (or a last line), and the cursor on a new line.</summary>
    public void Done()
    {
        lock (_gate)
        {
            if (_finished) return;
            _done = Math.Max(_done, _total);
            if (_first < 0) (_first, _firstAt) = (0, TimeSpan.Zero);
            var now = _clock();
            if (_inPlace)
            {
                Draw(now);
                _output.WriteLine();
                _drawnLength = 0;
            }
            else if (_lineTenth < 10) _output.WriteLine(Text(now, bar: false));
            _output.Flush();
            _finished = true;
        }
    }

    /// <summary>Leaves a bar that did not finish where it stands, on a line of its own.</summary>
    public void Dispose()
    {
        lock (_gate)
        {
            if (_finished) return;
            if (_inPlace && _drawnLength > 0) _output.WriteLine();
            _drawnLength = 0;
            _finished = true;
        }
    }

    private void Draw(TimeSpan now)
    {
        var text = Text(now, bar: true);
        // Without escape codes the old text is overwritten by padding; with them the line is erased first.
        int visible = Visible(text);
        _output.Write(_colour ? "\r\u001b[2K" + text : "\r" + text + new string(' ', Math.Max(0, _drawnLength - visible)));
        _output.Flush();
        _drawnLength = visible;
    }

    private void Clear()
    {
        if (_drawnLength == 0) return;
        _output.Write(_colour ? "\r\u001b[2K" : "\r" + new string(' ', _drawnLength) + "\r");
        _drawnLength = 0;
    }

    private static int Visible(string text)
    {
        int n = 0;
        for (int i = 0; i < text.Length; i++)
        {
            if (text[i] == '\u001b') { while (i < text.Length && text[i] != 'm') i++; continue; }
            n++;
        }
        return n;
    }

    private string Text(TimeSpan now, bool bar)
    {
        double fraction = Math.Clamp((double)_done / _total, 0, 1);
        double seconds = (now - _firstAt).TotalSeconds;
        double rate = seconds > 0 ? (_done - _first) / seconds : double.NaN;
        var sb = new StringBuilder(Label).Append(": ");
        if (bar)
        {
            int full = (int)(fraction * BarWidth);
            if (_colour) sb.Append("\u001b[32m");
            sb.Append('[').Append('#', full).Append('.', BarWidth - full).Append(']');
            if (_colour) sb.Append("\u001b[0m");
            sb.Append(' ');
        }
        sb.Append(string.Create(CultureInfo.InvariantCulture, $"{100 * fraction,5:F1} % {(_unit == "B" ? Amount(_done) : _done.ToString(CultureInfo.InvariantCulture))}/{Amount(_total)}"));
        if (double.IsFinite(rate) && rate > 0)
        {
            sb.Append(string.Create(CultureInfo.InvariantCulture, $", {Amount(rate)}/s"));
            if (_done < _total) sb.Append(", ETA ").Append(Eta((_total - _done) / rate));
            else sb.Append(string.Create(CultureInfo.InvariantCulture, $", {seconds:F1} s"));
        }
        return sb.ToString();
    }

    /// <summary>Bytes with a decimal prefix (MB, GB), counts as they are ("12 steps"), a rate to three figures.</summary>
    private string Amount(double v)
    {
        var c = CultureInfo.InvariantCulture;
        if (_unit == "B")
            return v switch
            {
                >= 1e9 => (v / 1e9).ToString("F2", c) + " GB",
                >= 1e6 => (v / 1e6).ToString("F1", c) + " MB",
                >= 1e3 => (v / 1e3).ToString("F1", c) + " kB",
                _ => v.ToString("F0", c) + " B",
            };
        return (v == Math.Floor(v) ? v.ToString("F0", c) : v.ToString("G3", c)) + " " + _unit;
    }

    private static string Eta(double seconds)
    {
        if (!double.IsFinite(seconds) || seconds > 359_999) return "--:--";
        var t = TimeSpan.FromSeconds(Math.Ceiling(seconds));
        return t.TotalHours >= 1 ? $"{(int)t.TotalHours}:{t.Minutes:D2}:{t.Seconds:D2}" : $"{t.Minutes}:{t.Seconds:D2}";
    }

    /// <summary>Lines written while a bar shows: the bar is cleared, the line printed, the bar drawn again below it.</summary>
    private sealed class AboveBar(Progress bar) : TextWriter
    {
        private readonly StringBuilder _pending = new();

        public override Encoding Encoding => bar._output.Encoding;

        public override void Write(char value)
        {
            lock (bar._gate)
            {
                if (value != '\n')
                {
                    _pending.Append(value);
                    return;
                }
                bar.Clear();
                bar._output.WriteLine(_pending.ToString().TrimEnd('\r'));
                _pending.Clear();
                if (!bar._finished && bar._first >= 0) bar.Draw(bar._clock());
                bar._output.Flush();
            }
        }

        public override void Write(string? value)
        {
            lock (bar._gate)
                foreach (var c in value ?? "") Write(c);
        }

        public override void WriteLine(string? value)
        {
            lock (bar._gate)
            {
                Write(value);
                Write('\n');
            }
        }

        public override void Flush()
        {
            lock (bar._gate) bar._output.Flush();
        }
    }
}

/// <summary><c>train</c> on a terminal: a bar over the run's steps below the step lines, fed by the report's observer.</summary>
public sealed class TrainingProgress : Training.ITrainingObserver, IDisposable
{
    private readonly Progress _bar;
    private readonly Training.ITrainingObserver? _inner;

    private TrainingProgress(Progress bar, Training.ITrainingObserver? inner) => (_bar, _inner) = (bar, inner);

    /// <summary>
    /// Where the run prints and whom it tells of steps: on a terminal, above a bar that each step moves (and
    /// <paramref name="inner"/> still sees every step); elsewhere <paramref name="stdout"/> and <paramref name="inner"/> as they
    /// are, since the step lines already are the plain record.
    /// </summary>
    public static (TextWriter Console, Training.ITrainingObserver? Observer, IDisposable? Bar) For(TextWriter stdout, long steps, Training.ITrainingObserver? inner)
    {
        if (!Progress.OnTerminal(stdout)) return (stdout, inner, null);
        var p = new TrainingProgress(Progress.Start(stdout, "train", steps, "steps"), inner);
        return (p._bar.Writer, p, p);
    }

    public void Step(Training.StepResult step, double? valLoss)
    {
        _inner?.Step(step, valLoss);
        _bar.Report(step.Step + 1);
    }

    public void MembershipEvent(string kind, string node, long step, double recoverySeconds) => _inner?.MembershipEvent(kind, node, step, recoverySeconds);

    public void Dispose() => _bar.Dispose();
}
