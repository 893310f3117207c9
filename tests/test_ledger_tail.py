"""A monitor's restart reads only the tail of its records: a long life does not make restarts
slow, and a torn last line is found without reading the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qcloop.monitor.benchmarks.loop_state import write_ledger
from qcloop.monitor.ops.ledger import JsonlLog, Ledger, LedgerError


def test_read_backwards_is_read_reversed_across_blocks(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    # lines of many lengths, so block boundaries (64 KiB) fall inside lines
    objs = [{"i": i, "pad": "x" * (i * 37 % 3000)} for i in range(400)]
    path.write_text("".join(json.dumps(o) + "\n" for o in objs) + "\n")  # and an empty line
    log = JsonlLog(path)
    assert path.stat().st_size > 3 * 65536
    assert list(log.read_backwards()) == log.read()[::-1] == objs[::-1]
    path.write_text('{"i": 0}\n[1, 2]\n')
    with pytest.raises(LedgerError, match="a line is not a JSON object"):
        list(JsonlLog(path).read_backwards())


def test_a_torn_tail_is_cut_off_from_a_long_log(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    whole = "".join(json.dumps({"i": i, "pad": "y" * 500}) + "\n" for i in range(300))
    path.write_text(whole + '{"i": 300, "pad": "' + "z" * 70000)  # torn across a block
    log = JsonlLog(path)
    assert path.read_text() == whole
    log.append({"i": 300})
    assert log.read()[-1] == {"i": 300} and len(log.read()) == 301


def test_restart_recovers_trailing_records_without_reading_older_ones(tmp_path: Path) -> None:
    write_ledger(tmp_path, 3000)
    records = (tmp_path / "records.jsonl").read_text().splitlines()
    ledger_lines = (tmp_path / "ledger.jsonl").read_text().splitlines()
    # a crash after the last two records were appended, before their ledger entries
    kept = [
        line for line in ledger_lines if '"seq": 2999' not in line and '"seq": 3000' not in line
    ]
    (tmp_path / "ledger.jsonl").write_text("\n".join(kept) + "\n")
    # an old record that is not JSON: a restart that read every record would fail on it
    records[10] = "not json"
    (tmp_path / "records.jsonl").write_text("\n".join(records) + "\n")
    ledger = Ledger(tmp_path)
    assert ledger.seq == 3000 and len(ledger.done) == 3000
    events = JsonlLog(tmp_path / "ledger.jsonl").read()
    assert [e["seq"] for e in events[-2:]] == [2999, 3000]  # recovered, oldest first
    assert len(Ledger(tmp_path).done) == 3000  # and not again
