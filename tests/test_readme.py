"""The README documents what the code does: its settings table is generated, its commands exist."""
import re
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
    assert "bash tools/setup_env.sh" in ci and 'python="$PWD/.venv/bin/python"' in ci and '"$python" -m pytest' in ci




def sampler_rows():
    """(sampler name, function column, ScaleCrafter, DemoFusion) of the README's sampler × mode table."""
    section = README.split("## Compatibility", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ")]
    header, body = rows[0], [r for r in rows[1:] if not set(r[0].strip()) <= set("-")]
    assert [c.strip() for c in header] == ["Sampler", "k-diffusion function", "ScaleCrafter", "DemoFusion"]
    return [tuple(c.strip() for c in row) for row in body]


def test_readme_sampler_table_names_real_functions_and_a_state_per_mode(k_diffusion):
    rows = sampler_rows()
    assert len({r[0] for r in rows}) == len(rows) == 20, "WebUI v1.10.1 has 20 samplers"
    for name, function, *modes in rows:
        for called in re.findall(r"`(sample_\w+)`", function):
            if "WebUI" not in function:
                assert hasattr(k_diffusion.sampling, called), f"{name}: no k_diffusion.sampling.{called}"
        for state in modes:
            assert re.match(r"\*\*exact\*\*|works\b|refused\b", state), f"{name}: {state!r}"
