"""ksup verify's oracle (supervisor/verify/tally.py) on a record written by hand: no broker."""

from __future__ import annotations

from pathlib import Path

from supervisor.verify.tally import Tally


def _row(partition: int, offset: int, done_ns: int = 1) -> str:
    return f"{partition} {offset} 123 0 {done_ns}\n"


def test_lost_below_reads_the_record_before_judging(tmp_path: Path) -> None:
    """Commits read before the call count as lost only what the record still lacks after it:
    verify's progress thread judged against a record last read before a fault began (the CI
    run of 43c1b03 printed 'lost so far 535' in a run that lost nothing)."""
    record = tmp_path / "record.txt"
    record.write_text(_row(0, 0) + _row(0, 1))
    tally = Tally(record)
    tally.poll()
    with record.open("a") as f:  # finished after the last poll, committed before the check
        f.write(_row(0, 2) + _row(1, 0))
    assert tally.lost_below({0: 3, 1: 1}) == 0
    assert tally.lost_below({0: 4, 1: 1}) == 1  # offset 3 was committed, never processed
    assert tally.distinct == 4


def test_a_line_still_being_written_waits_for_its_end(tmp_path: Path) -> None:
    record = tmp_path / "record.txt"
    record.write_text(_row(0, 0) + "0 1 12")
    tally = Tally(record)
    assert tally.lost_below({0: 2}) == 1
    with record.open("a") as f:
        f.write("3 0 5\n")
    assert tally.lost_below({0: 2}) == 0
