"""End-to-end: ``proreflow demo`` on tiny settings writes the report, with sane numbers."""

import json

from proreflow.cli import main


def test_demo_writes_report_tables_and_pictures(tmp_path):
    out = tmp_path / "report"
    args = ["demo", "--data", "moons", "--out", str(out), "--steps", "8", "--teacher-steps", "30",
            "--samples", "64", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert main(args) == 0
    for name in ("report.md", "results.json", "moons/samples.png", "moons/trajectories.png", "moons/loss.png"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())["moons"]
    # --steps is the budget in all, split like the preset's own stage steps (a quarter, a quarter, half)
    assert results["steps"] == 8 and [s["steps"] for s in results["stages"]] == [2, 2, 4]
    rows = {r["sampler"]: r for r in results["rows"]}
    assert set(rows) == {"teacher DDIM-32", "teacher DDIM-4", "student 4-step", "student 2-step", "student 1-step"}
    assert rows["teacher DDIM-32"]["fidelity"] == 0.0  # the reference is the teacher's own DDIM-32 sample
    assert rows["student 1-step"]["straightness"] == 0.0  # one step is a straight line
    assert [rows[f"student {n}-step"]["nfe"] for n in (4, 2, 1)] == [4, 2, 1]  # unguided 2D: one call a step
    report = (out / "report.md").read_text()
    assert "| student 4-step |" in report and "![samples.png](moons/samples.png)" in report

    # a second demo in the same folder resumes the finished run instead of deleting it: same student, same rows
    assert main(args) == 0
    again = {r["sampler"]: r for r in json.loads((out / "results.json").read_text())["moons"]["rows"]}
    assert {k: r["fidelity"] for k, r in again.items()} == {k: r["fidelity"] for k, r in rows.items()}
