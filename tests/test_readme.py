from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.strip().splitlines()]


def test_quick_start_is_two_commands_and_ci_runs_the_test_command():
    commands = quick_start()
    assert len(commands) == 2
    assert "proreflow demo" in commands[0]
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()


def test_ci_installs_into_a_new_virtual_environment():
    """CI must not lean on packages installed by hand on its machine (a newer pytest once hid a failure)."""
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    venv = next(i for i, line in enumerate(lines) if "-m venv" in line)
    activate = next(i for i, line in enumerate(lines) if "/bin/activate" in line)
    assert venv < activate < lines.index(quick_start()[1])
