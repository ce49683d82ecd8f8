"""The project's own set-up: CI must run exactly the README's install-and-test command."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    lines = ROOT.joinpath("README.md").read_text().splitlines()
    start = lines.index("```bash")
    assert start < 5, "the two set-up commands must open the README"
    readme_lines = lines[start:start + 3]
    ci = ROOT.joinpath(".ci", "run").read_text().strip().splitlines()[-1]
    assert ci == readme_lines[2], "the last line of .ci/run must be the README's second command"
    assert "pytest" in ci and "torch==2.13.0" in ci
    assert "slm quickstart" in readme_lines[1]
