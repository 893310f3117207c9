"""`qcloop monitor` against what an operator's scanner share can put in its inbox: every file
here is real, on disk, among good cases. The monitor must stay up, score the good cases, and
reject each bad one with its reason (``rejected/``, a ledger entry, ``CaseFailed``); a full disk
pauses intake without rejecting anything."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from qcloop.monitor.benchmarks.inbox import gzip_bomb
from qcloop.monitor.ops.ledger import JsonlLog
from qcloop.monitor.ops.monitor import Monitor
from tests.monitor_support import champions_of, feed_inbox, monitor_cfg, read_records

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ledger_rejections(out: Path) -> dict[str, dict]:
    return {
        e["source_file"]: e
        for e in JsonlLog(out / "ledger.jsonl").read()
        if e["event"] == "rejected"
    }


def test_hostile_files_are_rejected_and_the_good_ones_scored(
    run_copy: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    good = feed_inbox(inbox, tiny_cohort, "SA", {"A", "B"}, 3)
    # a header declaring 30000 x 30000 voxels (1.7 GiB): refused from its first bytes
    gzip_bomb(inbox / "bomb_SA_ED.nii.gz", (30000, 30000, 1), 64)
    # a plausible header over 2 GiB of zeros: only the declared voxels are ever inflated
    gzip_bomb(inbox / "deep_SA_ED.nii.gz", (96, 96, 4), 2048)
    os.symlink("loop_SA_ED.nii.gz", inbox / "loop_SA_ED.nii.gz")  # ELOOP on every open
    (other,) = feed_inbox(tmp_path / "other", tiny_cohort, "SA", {"C"}, 1)
    shutil.move(other, inbox / os.fsdecode(b"scan_\xff\xfe_SA_ED.nii.gz"))  # not UTF-8
    (inbox / "cut_SA_ED.nii.gz").write_bytes(good[1].read_bytes()[:2000])  # truncated
    (inbox / "notes_SA.txt").write_text("not an image")
    os.mkfifo(inbox / "pipe_SA_ED.nii.gz")  # never opened: not a regular file

    mon = Monitor(inbox, out, monitor_cfg(run_copy), champions_of(run_copy, ("SA",)), settle_s=0)
    try:
        mon.step()
    finally:
        mon.close()
    records = read_records(out)
    scored = {r["source_file"] for r in records}
    assert {p.name for p in good} <= scored
    assert "scan_\\xff\\xfe_SA_ED.nii.gz" in scored  # its name, readably, in the record
    rejected = _ledger_rejections(out)
    assert "exceeds the limit" in rejected["bomb_SA_ED.nii.gz"]["reason"]
    assert "cannot read it" in rejected["loop_SA_ED.nii.gz"]["reason"]
    assert rejected["cut_SA_ED.nii.gz"]["stage"] == "read"
    assert "not a NIfTI file" in rejected["notes_SA.txt"]["reason"]
    assert "deep_SA_ED.nii.gz" in rejected or "deep_SA_ED.nii.gz" in scored
    assert sorted(p.name for p in inbox.iterdir()) == ["pipe_SA_ED.nii.gz"]
    for name in ("bomb_SA_ED.nii.gz", "loop_SA_ED.nii.gz", "cut_SA_ED.nii.gz"):
        assert (out / "rejected" / f"{name}.reason.txt").read_text().startswith(name)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_an_unreadable_file_is_rejected(run_copy: Path, tiny_cohort: Path, tmp_path: Path) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    (good,) = feed_inbox(inbox, tiny_cohort, "SA", {"A"}, 1)
    locked = inbox / "locked_SA_ED.nii.gz"
    shutil.copy2(good, locked)
    locked.chmod(0)
    mon = Monitor(inbox, out, monitor_cfg(run_copy), champions_of(run_copy, ("SA",)), settle_s=0)
    try:
        mon.step()
    finally:
        mon.close()
    assert "locked_SA_ED.nii.gz" in _ledger_rejections(out)
    assert good.name in {r["source_file"] for r in read_records(out)}


def test_a_full_disk_pauses_intake_and_rejects_nothing(
    run_copy: Path, tiny_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import qcloop.monitor.data as data

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    fed = feed_inbox(inbox, tiny_cohort, "SA", {"A"}, 2)
    real_save, calls = data.save_label_map, []

    def disk_full_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(data, "save_label_map", disk_full_once)
    now = [1000.0]
    mon = Monitor(
        inbox, out, monitor_cfg(run_copy), champions_of(run_copy, ("SA",)), settle_s=0,
        clock=lambda: now[0], disk_pause_s=30,
    )  # fmt: skip
    try:
        mon.step()
        assert sorted(p.name for p in inbox.iterdir()) == sorted(p.name for p in fed)
        assert read_records(out) == [] and not (out / "rejected").exists()
        now[0] += 10
        assert mon.step() == 0  # still paused
        now[0] += 30
        mon.step()
    finally:
        mon.close()
    assert sorted(r["source_file"] for r in read_records(out)) == sorted(p.name for p in fed)
    assert not list(inbox.iterdir())


def test_an_unexpected_failure_rejects_that_file_only(
    run_copy: Path, tiny_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qcloop.monitor.ops.intake import Intake

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    fed = feed_inbox(inbox, tiny_cohort, "SA", {"A"}, 3)
    real = Intake._file_scored

    def fails_on_second(self, ident, *args):
        if ident.path.name == fed[1].name:
            raise KeyError("a bug in a code path nobody tested")
        return real(self, ident, *args)

    monkeypatch.setattr(Intake, "_file_scored", fails_on_second)
    mon = Monitor(inbox, out, monitor_cfg(run_copy), champions_of(run_copy, ("SA",)), settle_s=0)
    try:
        assert mon.process_file(fed[1]) == "rejected"  # moved aside, CaseFailed broadcast
        mon.step()
    finally:
        mon.close()
    assert {r["source_file"] for r in read_records(out)} == {fed[0].name, fed[2].name}
    event = _ledger_rejections(out)[fed[1].name]
    assert event["stage"] == "internal" and "KeyError" in event["reason"]


def test_a_file_that_cannot_be_moved_aside_is_skipped(
    run_copy: Path, tiny_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qcloop.monitor.ops.intake import Intake

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    fed = feed_inbox(inbox, tiny_cohort, "SA", {"A"}, 2)
    stuck = fed[0].name

    def broken_take(self, path, scorers):
        if path.name == stuck:
            raise RuntimeError("cannot score")
        return real_take(self, path, scorers)

    def broken_reject(self, path, *args, **kwargs):
        if path.name == stuck:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_reject(self, path, *args, **kwargs)

    real_take, real_reject = Intake.take, Intake.reject
    monkeypatch.setattr(Intake, "take", broken_take)
    monkeypatch.setattr(Intake, "reject", broken_reject)
    mon = Monitor(inbox, out, monitor_cfg(run_copy), champions_of(run_copy, ("SA",)), settle_s=0)
    try:
        assert mon.process_file(fed[0]) == "stuck"
        assert mon.step() == 1  # the other file only: the stuck one is not retried
    finally:
        mon.close()
    assert {r["source_file"] for r in read_records(out)} == {fed[1].name}
    assert (inbox / stuck).exists()


def test_the_bomb_file_is_small_and_inflates_as_declared(tmp_path: Path) -> None:
    """The test's bomb is what it claims: about 2 KiB per MiB, a valid gzip stream."""
    path = gzip_bomb(tmp_path / "b.nii.gz", (96, 96, 4), 8)
    assert path.stat().st_size < 8 * 4096
    inflated = zlib.decompressobj(wbits=31)
    total, data = 0, path.read_bytes()
    while data:
        total += len(inflated.decompress(data))
        data = inflated.unused_data
        if data:
            inflated = zlib.decompressobj(wbits=31)
    assert total == 352 + 8 * (1 << 20)


def test_the_inbox_benchmark_counts_what_each_pass_did(tiny_run: Path, tiny_cohort: Path) -> None:
    from qcloop.monitor.benchmarks.inbox import run_inbox_benchmark

    figures = run_inbox_benchmark(tiny_run, tiny_cohort, cases=2, bomb_mib=16)
    assert figures["good"]["case"] == 2 and figures["good"]["rejected"] == 0
    hostile = figures["hostile"]
    assert hostile["case"] + hostile["rejected"] == 2 + len(figures["hostile_files"])
    assert hostile["rejected"] >= 5  # the deep bomb's plausible header may be scored
    assert all(f["peak_rss_mib"] > 0 for f in (figures["good"], hostile))


def test_one_monitor_per_output_folder(run_copy: Path, tmp_path: Path) -> None:
    """A second monitor on the same OUT is refused, in this process or another, naming the
    first one's process; the folder is free again once the first closes or is killed."""
    import signal
    import subprocess
    import sys

    from qcloop.monitor.ops.out_lock import OutFolderBusy, OutLock

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    cfg, champs = monitor_cfg(run_copy), champions_of(run_copy, ("SA",))
    first = Monitor(inbox, out, cfg, champs, settle_s=0)
    try:
        with pytest.raises(OutFolderBusy, match=f"pid {os.getpid()}"):
            Monitor(tmp_path / "inbox2", out, cfg, champs, settle_s=0)
        probe = "import sys; from pathlib import Path; from qcloop.monitor.ops.out_lock import "
        probe += "OutLock; OutLock(Path(sys.argv[1]))"
        done = subprocess.run([sys.executable, "-c", probe, str(out)], capture_output=True)
        assert done.returncode == 1 and b"in use by another qcloop monitor" in done.stderr
    finally:
        first.close()
    Monitor(inbox, out, cfg, champs, settle_s=0).close()  # free again

    hold = "import sys, time; from pathlib import Path; from qcloop.monitor.ops.out_lock import "
    hold += "OutLock; lock = OutLock(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        with pytest.raises(OutFolderBusy, match=f"pid {holder.pid}"):
            OutLock(out)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    OutLock(out).release()  # the kernel dropped the dead holder's lock


def test_the_http_endpoint_drops_silent_and_slow_clients_and_answers_health(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The monitor's HTTP endpoint: a connection that sends nothing is closed after the idle
    timeout, a webhook body that trickles in gets 408, and neither keeps ``/healthz`` (no
    secret needed) from answering meanwhile."""
    import json
    import socket
    import time
    import urllib.request

    import qcloop.monitor.ops.webhook as webhook
    from qcloop.monitor.core.http_endpoint import HttpEndpoint
    from qcloop.monitor.ops.http_app import monitor_app

    monkeypatch.setattr(webhook, "BODY_TIMEOUT_S", 0.5)
    app = monitor_app(lambda: {"status": "ok"}, webhook.AlertDispatcher(lambda v, a: "q", "s3"))
    hook = HttpEndpoint(app, idle_timeout_s=0.5).start()
    try:
        silent = [socket.create_connection((hook.host, hook.port), timeout=10) for _ in range(8)]
        with urllib.request.urlopen(f"{hook.url}/healthz", timeout=5) as r:
            assert r.status == 200 and json.loads(r.read()) == {"status": "ok"}
        t0 = time.monotonic()
        for conn in silent:
            assert conn.recv(1024) == b""  # closed by the server, not by our 10 s timeout
            conn.close()
        assert time.monotonic() - t0 < 5
        with socket.create_connection((hook.host, hook.port), timeout=10) as slow:
            slow.sendall(
                b"POST /alertmanager HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3\r\n"
                b"Content-Length: 100\r\n\r\n{"
            )
            reply = slow.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408")
    finally:
        hook.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB file system (tmpfs) at ``tmp_path/disk``; skipped where mounting is not
    allowed (an unprivileged container)."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mount.stderr.strip() or mount.returncode}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_really_full_disk_pauses_intake_and_leaves_whole_lines(
    run_copy: Path, tiny_cohort: Path, tmp_path: Path, small_disk: Path
) -> None:
    """OUT on a 4 MiB file system filled to the last byte: the monitor writes nothing torn,
    rejects nothing, keeps the cases in the inbox, and scores them all once space is freed."""
    inbox, out = tmp_path / "inbox", small_disk / "out"
    fed = feed_inbox(inbox, tiny_cohort, "SA", {"A", "B"}, 4)
    now = [1000.0]
    mon = Monitor(
        inbox, out, monitor_cfg(run_copy), champions_of(run_copy, ("SA",)), settle_s=0,
        clock=lambda: now[0], disk_pause_s=30, figures="none",
    )  # fmt: skip
    filler = small_disk / "filler"
    try:
        with contextlib.suppress(OSError), open(filler, "wb") as fh:  # every free byte taken
            while True:
                fh.write(b"\0" * 4096)
                fh.flush()
        with contextlib.suppress(OSError), open(small_disk / "crumbs", "wb") as fh:
            while True:
                fh.write(b"\0")
                fh.flush()
        mon.step()
        assert sorted(p.name for p in inbox.iterdir()) == sorted(p.name for p in fed)
        assert not (out / "rejected").exists()
        for log_file in (out / "records.jsonl", out / "ledger.jsonl"):
            if log_file.exists():  # nothing torn: every line whole
                text = log_file.read_text()
                assert text == "" or text.endswith("\n")
        filler.unlink()
        now[0] += 31
        mon.step()
    finally:
        mon.close()
    assert sorted(r["source_file"] for r in read_records(out)) == sorted(p.name for p in fed)
    assert not list(inbox.iterdir())
    JsonlLog(out / "ledger.jsonl").read()  # readable: a restart would open it


def test_an_append_cut_short_by_a_full_disk_leaves_no_torn_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record whose write fails halfway (ENOSPC after some bytes) is taken back, so the next
    append does not follow a torn line (which would make the ledger unreadable)."""
    log = JsonlLog(tmp_path / "records.jsonl")
    log.append({"a": 1})
    real_write = os.write

    def half_then_full(fd: int, data: bytes) -> int:
        if len(data) > 8:
            real_write(fd, bytes(data[:8]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError, match="No space"):
        log.append({"b": "x" * 40})
    monkeypatch.setattr(os, "write", real_write)
    log.append({"c": 3})
    assert JsonlLog(tmp_path / "records.jsonl").read() == [{"a": 1}, {"c": 3}]
