"""benchmarks/throughput.py --tiny: runs on CPU and appends a complete table row."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "throughput.py"


@pytest.mark.slow
def test_tiny_throughput_writes_a_row(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "throughput", module)  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    assert module.main(["--tiny", "--out-md", str(tmp_path / "t.md")]) == 0
    rows = [line for line in (tmp_path / "t.md").read_text().splitlines() if line.startswith("| tiny")]
    assert len(rows) == 1 and rows[0].count("|") == module.HEADER.splitlines()[0].count("|")
    assert "%" in rows[0] and "nan" not in rows[0]
