"""pyproject.toml and environment.yml list the same packages with the same lower bounds."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"pytorch": "torch"}


def _parse(spec):
    name, bound = re.match(r"^([A-Za-z0-9_.\-]+)\s*(.*)$", spec.strip()).groups()
    name = name.lower().replace("_", "-")
    return CONDA_NAMES.get(name, name), bound.replace(" ", "")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pip = dict(_parse(s) for s in project["dependencies"] + project["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = dict(_parse(d) for d in env["dependencies"]
                 if isinstance(d, str) and not re.match(r"^(python|pip)\b", d))
    assert conda == pip
    assert any(isinstance(d, dict) and "pip" in d for d in env["dependencies"])  # installs this package


def test_import_minipsft_needs_no_trl():
    """TRL is an optional integration: importing the package (and its CLI) must not import it."""
    import subprocess
    import sys

    code = ("import sys, minipsft, minipsft.cli, minipsft.lab.runner, minipsft.lab.rl_stage, minipsft.lab.rl, minipsft.lab.reports, "
            "minipsft.lab.claims; "
            "print('trl' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
