"""Progress lines carry the count, the rate and the ETA wherever the output goes."""

from __future__ import annotations

import io
import logging
import re

from seerlike.progress import Progress


def test_lines_say_how_far_how_fast_and_how_long_still():
    out = io.StringIO()
    with Progress(400, "extract res5", stream=out, every_s=0) as bar:
        bar.t0 -= 10.0  # as if it had started 10 s ago: 100 done -> 10 img/s, 300 left -> 30 s
        bar.update(100)
    first, last = out.getvalue().splitlines()
    assert first == "extract res5: 100/400 img (25%), 10.0 img/s, ETA 30s"
    assert re.fullmatch(r"extract res5: done, 100 img in 10s \(10\.0 img/s\)", last)


def test_lines_are_rate_limited_and_unknown_totals_have_no_eta():
    out = io.StringIO()
    bar = Progress(None, "scan", unit="file", stream=out, every_s=3600)
    for _ in range(50):
        bar.update()
    assert out.getvalue() == ""  # nothing before the interval has passed
    bar.every_s = 0
    bar.update()
    assert re.fullmatch(r"scan: 51 file, [\d,.]+ file/s\n", out.getvalue())


def test_without_a_terminal_the_lines_go_to_the_log(caplog, monkeypatch):
    monkeypatch.setenv("SEERLIKE_PROGRESS_EVERY_S", "0")
    with caplog.at_level(logging.INFO, logger="seerlike.progress"):
        with Progress(2, "kNN queries") as bar:  # pytest's captured stderr is not a TTY
            bar.update(2)
    assert [r.name for r in caplog.records] == ["seerlike.progress"] * 2
    assert "kNN queries: 2/2 img (100%)" in caplog.records[0].getMessage()


def test_a_failed_stage_does_not_claim_done():
    out = io.StringIO()
    try:
        with Progress(5, "export", unit="file", stream=out, every_s=3600):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert "done" not in out.getvalue()
