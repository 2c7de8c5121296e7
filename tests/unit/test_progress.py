"""The progress bar: redrawn in place on a terminal, whole lines elsewhere."""

from __future__ import annotations

import io

from outbox._progress import ProgressBar


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_line_is_redrawn_in_place_and_ended_once() -> None:
    clock, stream = Clock(), Terminal()
    bar = ProgressBar("campaign", total=200, stream=stream, width=10, clock=clock)

    for done in (50, 100, 150, 200):
        clock.now += 0.5
        bar.update(done)
    bar.close()

    output = stream.getvalue()
    assert output.count("\r") == 5 and output.count("\n") == 1 and output.endswith("\n")
    final = output.rsplit("\r", 1)[1].strip()
    assert final == "campaign  [##########]  200/200  100%  100/s  2.0s"


def test_elsewhere_it_prints_a_line_per_interval_and_a_last_line() -> None:
    clock, stream = Clock(), io.StringIO()
    bar = ProgressBar("retrying", total=1000, stream=stream, width=4, clock=clock)

    for done in range(0, 1001, 100):
        clock.now += 0.5
        bar.update(done)
    bar.close()

    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert len(lines) == 4  # at 0.5 s, 2.5 s, 4.5 s, and the final line
    assert lines[-1].startswith("retrying  [####]  1,000/1,000  100%")


def test_a_growing_or_unknown_total_and_a_note_are_shown() -> None:
    clock, stream = Clock(), io.StringIO()
    bar = ProgressBar("delivering", stream=stream, unit="messages", width=4, clock=clock)
    clock.now += 1
    bar.update(30, note="retries 2")
    assert stream.getvalue().splitlines()[-1] == "delivering  30 messages  30/s  1.0s  retries 2"

    bar.update(40, total=80)
    bar.close(note="done")
    assert stream.getvalue().splitlines()[-1] == "delivering  [##--]  40/80   50%  40/s  1.0s  done"


def test_a_closed_stream_does_not_fail_the_work() -> None:
    stream = io.StringIO()
    bar = ProgressBar("x", total=1, stream=stream)
    stream.close()
    bar.update(1)
    bar.close()


def test_a_log_does_not_get_the_same_final_line_twice() -> None:
    clock, stream = Clock(), io.StringIO()
    bar = ProgressBar("delivering", total=10, stream=stream, width=4, clock=clock)
    bar.update(10)
    clock.now += 0.1
    bar.close()
    assert len(stream.getvalue().splitlines()) == 1
