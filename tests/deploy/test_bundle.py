"""`make bundle`: a signed bundle of rego/ (no tests), revision = the git commit, signed with
the given key or a generated dev key that stays out of git."""

from __future__ import annotations

import json
import subprocess
import tarfile

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.deploy.manifests import REPO, make_bundle


def read_bundle(path):
    with tarfile.open(path) as tar:
        return {m.name.lstrip("/"): tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def git_head() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_signed_with_the_given_key(tmp_path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file = tmp_path / "signing.pem"
    key_file.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    files = read_bundle(make_bundle(tmp_path / "out", key_file))

    assert {"rego/querygate/decision.rego", "data.json", ".manifest", ".signatures.json"} <= set(files)
    assert not [name for name in files if name.endswith("_test.rego")]
    manifest = json.loads(files[".manifest"])
    assert manifest["revision"].removesuffix("-dirty") == git_head()
    [token] = json.loads(files[".signatures.json"])["signatures"]
    claims = jwt.decode(token, key.public_key(), algorithms=["RS256"])
    signed = {entry["name"] for entry in claims["files"]}
    assert signed == set(files) - {".signatures.json"}
    published = (tmp_path / "out" / "verification-key.pem").read_bytes()
    assert published == key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_dev_key_is_generated_once_and_kept_private(tmp_path):
    out = tmp_path / "out"
    make_bundle(out)
    dev_key = out / "dev-signing-key.pem"
    assert dev_key.stat().st_mode & 0o077 == 0
    first = dev_key.read_bytes()
    make_bundle(out)
    assert dev_key.read_bytes() == first
    # The default location, .querygate/bundle, is ignored by git.
    ignored = subprocess.run(["git", "check-ignore", "-q", ".querygate/bundle/dev-signing-key.pem"],
                             cwd=REPO, check=False)
    assert ignored.returncode == 0
