"""A long stage writing to a log file (Slurm, submitit, a redirect) still shows its progress."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_extract_writes_progress_lines_with_rate_and_eta_into_a_log_file(tmp_path, cifar_dir):
    images = tmp_path / "images" / "cat"
    images.mkdir(parents=True)
    for src in sorted((cifar_dir / "train" / "cat").glob("*.jpg"))[:40]:
        (images / src.name).symlink_to(src)
    log = tmp_path / "extract.log"
    with open(log, "w") as f:  # a file, not a terminal: no tqdm bar, log lines instead
        rc = subprocess.run([sys.executable, "-m", "seerlike", "extract", "--checkpoint", "random:resnet10_cifar",
                             "--data", str(tmp_path / "images"), "--out", str(tmp_path / "feats"), "--layer", "pool",
                             "--image-size", "32", "--batch-size", "8"],
                            stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, timeout=300,
                            env={**os.environ, "SEERLIKE_PROGRESS_EVERY_S": "0", "OMP_NUM_THREADS": "1",
                                 "PYTHONPATH": str(ROOT)}).returncode
    text = log.read_text()
    assert rc == 0, text
    assert re.search(r"extract pool: 8/40 img \(20%\), [\d.,]+ img/s, ETA \d+s", text), text
    assert re.search(r"extract pool: done, 40 img in \d+s", text) and "\r" not in text
