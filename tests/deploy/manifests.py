"""Render the kustomize layouts in deploy/k8s and check them with deploy/policy/ (real tools).

Shared by tests/deploy (render, validate, rules) and tests/integration/test_sidecar.py (which
runs the OPA and gateway configuration that the sidecar layout ships).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from app.devstack import find_opa

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
POLICY = REPO / "deploy" / "policy"

# Every layout a platform team may apply.
LAYOUTS = {
    "dev": K8S / "overlays" / "dev",
    "prod": K8S / "overlays" / "prod",
    "shared-gateway": K8S / "shared-gateway",
}


def kustomize_bin() -> str:
    """$QUERYGATE_KUSTOMIZE_BIN, the Makefile's bin/kustomize, then PATH."""
    for candidate in (os.environ.get("QUERYGATE_KUSTOMIZE_BIN"), str(REPO / "bin" / "kustomize")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    on_path = shutil.which("kustomize")
    if on_path:
        return on_path
    raise RuntimeError("no kustomize binary: run `make kustomize` or set QUERYGATE_KUSTOMIZE_BIN")


@functools.cache
def _render(path: Path) -> str:
    result = subprocess.run(
        [kustomize_bin(), "build", str(path)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"kustomize build {path} failed:\n{result.stderr}")
    return result.stdout


def render(path: Path) -> list[dict[str, Any]]:
    """Every object `kustomize build path` renders (a fresh copy each call)."""
    return [doc for doc in yaml.safe_load_all(_render(path)) if doc]


def find(objects: list[dict[str, Any]], kind: str, name_prefix: str = "") -> dict[str, Any]:
    """The one object of this kind whose name starts with the prefix (ConfigMaps get a hash)."""
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].startswith(name_prefix)]
    assert len(found) == 1, f"expected one {kind} {name_prefix}*, found {len(found)}"
    return found[0]


def container(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The container (or native sidecar) called ``name`` in the layout's Deployment."""
    spec = find(objects, "Deployment")["spec"]["template"]["spec"]
    for c in spec.get("initContainers", []) + spec["containers"]:
        if c["name"] == name:
            return dict(c)
    raise KeyError(name)


def violations(objects: list[dict[str, Any]]) -> list[dict[str, str]]:
    """deploy/policy's violations for these objects, evaluated by the real opa."""
    result = subprocess.run(
        [find_opa(), "eval", "--format", "json", "--stdin-input", "--data", str(POLICY),
         "data.manifests.violations"],
        input=json.dumps({"objects": objects}), capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"opa eval failed:\n{result.stderr}{result.stdout}")
    answer = json.loads(result.stdout)
    found: list[dict[str, str]] = answer["result"][0]["expressions"][0]["value"]
    return found


def make_bundle(bundle_dir: Path, signing_key: Path | None = None) -> Path:
    """Run `make bundle` into ``bundle_dir`` (with a given key, or its dev key) → the tarball."""
    args = ["make", "-s", "-C", str(REPO), "bundle", f"BUNDLE_DIR={bundle_dir}",
            f"OPA_BIN={find_opa()}"]
    if signing_key is not None:
        args.append(f"BUNDLE_SIGNING_KEY={signing_key}")
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"make bundle failed:\n{result.stdout}{result.stderr}")
    return bundle_dir / "querygate.tar.gz"
