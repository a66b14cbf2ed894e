"""textlabel.progress: the lines a log file gets instead of redrawn bars (unit tests: no Ray, no S3)."""

from __future__ import annotations

import io

from textlabel.progress import Every, Labelling, Ticker, interactive


def test_a_labelling_line_says_what_is_done_the_rate_and_the_time_left():
    run = Labelling(files=12, bytes=1000, started=0.0)
    run.part_done(rows=900, size=500, parts=2)  # half of a 500-byte file
    run.part_done(rows=900, size=500, parts=2)
    run.file_done()
    assert run.line(now=10.0) == ("labelled 1/12 files (50% of the bytes): 1,800 rows, 180 rows/s; 10 s in, "
                                  "about 10 s left")
    run.part_done(rows=5, size=500, parts=1)
    run.file_done(failed=True)
    assert run.line(now=4000.0) == ("labelled 2/12 files (100% of the bytes): 1,805 rows, 0 rows/s; 1 h 06 min in; "
                                    "1 file(s) FAILED so far")


def test_a_run_with_nothing_done_yet_promises_no_end_time():
    assert Labelling(files=3, bytes=0, started=0.0).line(now=75.0) == (
        "labelled 0/3 files (0% of the bytes): 0 rows, 0 rows/s; 1 min 15 s in")


def test_every_is_due_once_per_period_and_never_at_zero():
    now = [0.0]
    gate = Every(5, clock=lambda: now[0])
    seen = []
    for t in range(0, 21):
        now[0] = float(t)
        seen.append(gate.due())
    assert [t for t, due in enumerate(seen) if due] == [5, 10, 15, 20]
    assert not any(Every(0, clock=lambda: 1e9).due() for _ in range(3))


def test_the_ticker_logs_a_last_line_and_none_when_off():
    lines: list[str] = []
    with Ticker(lambda: f"line {len(lines)}", every=3600, log=lines.append):
        pass
    assert lines == ["line 0"]  # the period never came: only where the run ended
    with Ticker(lambda: "never", every=0, log=lines.append):
        pass
    assert lines == ["line 0"]


def test_a_pipe_or_a_closed_stream_is_not_a_terminal():
    assert not interactive(io.StringIO())
    closed = io.StringIO()
    closed.close()
    assert not interactive(closed)
