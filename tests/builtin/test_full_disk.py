"""A full disk (a file-size limit, as the process sees it: writes past it fail with EFBIG) while a teacher is
cached, through the real command line: one line, exit code 1 (the machine's failure, not the input's), and no
incomplete cache entry left behind."""

from __future__ import annotations

import os
import resource
import subprocess
import sys


def test_a_teacher_cached_on_a_full_disk_exits_1_and_leaves_no_entry(tmp_path):
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))

    done = subprocess.run([sys.executable, "-m", "proreflow.cli", "teacher", "--data", "moons", "--steps", "5",
                           "--cache-dir", str(tmp_path / "cache"), "--quiet"], capture_output=True, text=True,
                          preexec_fn=limit, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, done.stderr
    assert len(lines) == 1 and "File too large" in lines[0] and "free space and run again" in lines[0], lines
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert not list((tmp_path / "cache").glob("teachers/*"))
