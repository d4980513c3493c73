"""The Makefile's last way to obtain OPA, the release binary: it picks the machine's OS and
architecture and installs the binary only when its SHA-256 matches the release's checksum
file. Run with no Go and no opa on PATH, and a curl that serves files from a directory
named like the release's (this machine reaches package registries only)."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
BINARY = b"#!/bin/sh\necho 'Version: 1.22.0'\n"


def _release_name() -> str:
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}[
        platform.machine().lower()]
    return f"opa_linux_{arch}_static" if platform.system() == "Linux" else f"opa_darwin_{arch}"


def _make_opa(tmp_path: Path, checksum: str) -> subprocess.CompletedProcess[str]:
    served = tmp_path / "served"
    served.mkdir()
    name = _release_name()
    (served / name).write_bytes(BINARY)
    (served / f"{name}.sha256").write_text(f"{checksum}  {name}\n")
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    # curl -fsSL [-o FILE] URL: the URL's last part from the served directory.
    (stubs / "curl").write_text(
        "#!/bin/sh\nout=; while [ $# -gt 1 ]; do case $1 in -o) out=$2; shift;; esac; shift; done\n"
        f'file="{served}/$(basename "$1")"; [ -f "$file" ] || exit 22\n'
        'if [ -n "$out" ]; then cp "$file" "$out"; else cat "$file"; fi\n')
    (stubs / "curl").chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    path = ":".join([str(stubs), *(p for p in ("/usr/bin", "/bin") if Path(p).exists())])
    env = {"PATH": path, "HOME": str(tmp_path)}
    assert shutil.which("go", path=path) is None and shutil.which("opa", path=path) is None
    return subprocess.run(["make", "-s", "-f", str(REPO / "Makefile"), "bin/opa", "OPA_BIN="],
                          cwd=work, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(platform.system() not in ("Linux", "Darwin"), reason="POSIX make")
def test_the_release_binary_is_installed_when_its_checksum_matches(tmp_path):
    done = _make_opa(tmp_path, hashlib.sha256(BINARY).hexdigest())
    assert done.returncode == 0, done.stdout + done.stderr
    assert _release_name() in done.stdout and "SHA-256" in done.stdout
    installed = tmp_path / "work" / "bin" / "opa"
    assert installed.read_bytes() == BINARY and os.access(installed, os.X_OK)


@pytest.mark.skipif(platform.system() not in ("Linux", "Darwin"), reason="POSIX make")
def test_a_binary_whose_checksum_differs_is_not_installed(tmp_path):
    done = _make_opa(tmp_path, "0" * 64)
    assert done.returncode != 0
    assert "checksum mismatch" in done.stdout + done.stderr
    assert not (tmp_path / "work" / "bin" / "opa").exists()
    assert not list((tmp_path / "work" / "bin").glob("opa*"))
