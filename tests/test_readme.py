"""The README's set-up commands stay true: CI runs exactly the README's test command."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci_command = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line.startswith("python3 -m venv")]
    assert len(ci_command) == 1
    readme = (ROOT / "README.md").read_text()
    assert ci_command[0] in readme, "README's test command and .ci/run differ"


def test_readme_main_command_runs_the_demo():
    readme = (ROOT / "README.md").read_text()
    assert "splatopt demo" in readme.split("```")[1]
