"""The machine facts every benchmark run records: its speed, read at the start and the end."""

from __future__ import annotations

from benchmarks import report


def test_calibration_times_the_loop_and_the_event_decode() -> None:
    speed = report.calibration(rounds=1)
    assert set(speed) == {"loop_ns", "json_event_us", "tcp_roundtrip_us"}
    # Any machine that runs Python at all lands far inside these bounds; zero or negative
    # would mean the timing did not happen.
    assert 1 < speed["loop_ns"] < 10_000
    assert 0.1 < speed["json_event_us"] < 1_000
    assert 0.5 < speed["tcp_roundtrip_us"] < 100_000


def test_speed_line_gives_both_readings_or_says_it_was_not_measured() -> None:
    mach = {
        "calibration": {"loop_ns": 64.7, "json_event_us": 4.34, "tcp_roundtrip_us": 9.8},
        "calibration_end": {"loop_ns": 70.1, "json_event_us": 4.9, "tcp_roundtrip_us": 11.2},
    }
    line = report._speed_line(mach)
    assert "64.7 ns" in line and "4.34 µs" in line and "9.8 µs at the start" in line
    assert "70.1 ns, 4.9 µs and 11.2 µs at the end" in line
    assert "at the end" not in report._speed_line({"calibration": mach["calibration"]})
    assert report._speed_line({}) == "- **Machine speed:** not measured."
