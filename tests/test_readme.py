"""The README documents what the code does: its settings table is generated, its commands exist."""
from pathlib import Path

from tools.settings_table import table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_holds_the_generated_settings_table():
    assert table() in README, "run `python -m tools.settings_table` and paste its output into the README"


def test_readme_names_the_two_commands_and_ci_runs_the_test_one():
    assert "bash tools/setup_env.sh && .venv/bin/python -m tools.demo" in README
    assert "bash tools/setup_env.sh && .venv/bin/python -m pytest" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "tools/setup_env.sh" in ci and ".venv/bin/python -m pytest" in ci


def test_readme_images_exist():
    for line in README.splitlines():
        if line.startswith("![") and "](" in line:
            assert (ROOT / line.split("](")[1].rstrip(")")).exists(), line
