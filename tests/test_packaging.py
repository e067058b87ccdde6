"""The install story a newcomer reads: the CPU torch index, extras that resolve, one script building every wheel."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def _pyproject(path: Path) -> dict:
    return tomllib.loads((path / "pyproject.toml").read_text())


def _distributions() -> dict[str, Path]:
    """name -> directory of every first-party distribution (the example plugins are not released)."""
    found = {}
    for pyproject in ROOT.glob("**/pyproject.toml"):
        directory = pyproject.parent
        if "plugins" in directory.relative_to(ROOT).parts[:1] or ".git" in directory.parts:
            continue
        found[_pyproject(directory)["project"]["name"]] = directory
    return found


def test_the_readme_and_dev_install_say_how_a_cpu_machine_gets_the_cpu_torch():
    readme = (ROOT / "README.md").read_text()
    first_command = re.search(r"```bash\n(.*?)\n```", readme, re.S).group(1)
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in first_command
    assert "`pip install torch==2.13.0`" in readme  # the plain command for GPU machines
    assert "download.pytorch.org/whl/cpu" in (ROOT / "scripts" / "dev-install.sh").read_text()


def test_every_extra_pins_distributions_that_exist_at_the_shared_version():
    dists = _distributions()
    meta = _pyproject(ROOT)["project"]
    version = meta["version"]
    for extra, requirements in meta["optional-dependencies"].items():
        for requirement in requirements:
            match = re.fullmatch(r"(kvik[\w-]*)(\[[\w,]+\])?==([\w.]+)", requirement)
            if match is None:
                continue
            name, _, pinned = match.groups()
            assert name in dists or name == "kvik", f"kvik[{extra}] needs {name}, which is no distribution here"
            assert pinned == version, f"kvik[{extra}] pins {requirement}, not {version}"
    for extra in ("cpu", "cuda", "server"):  # structured output comes with the main installs
        assert f"kvik-core[structured]=={version}" in meta["optional-dependencies"][extra]
    assert "structured" in _pyproject(dists["kvik-core"])["project"]["optional-dependencies"]


def test_build_wheels_builds_every_distribution():
    script = (ROOT / "scripts" / "build-wheels.sh").read_text()
    listed = set(re.search(r"DISTS=\((.*?)\)", script, re.S).group(1).split())
    expected = {str(path.relative_to(ROOT)) or "." for path in _distributions().values()}
    assert listed == expected
    assert "bash scripts/check-wheels.sh" in (ROOT / ".ci" / "run").read_text()
