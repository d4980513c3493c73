"""The sidecar layout's processes, run locally from the configuration the manifests ship.

OPA gets exactly the args of the rendered `opa` container and the opa-config.yaml of the
rendered ConfigMap; the gateway gets exactly the rendered querygate ConfigMap. Only what a
cluster would provide differently is substituted: mount paths become local directories,
ports become free loopback ports, the bundle service URL points at a bundle server started
here (it insists on the bearer token the config names), Secret values come from the test,
and the audit sink is the spool's file (there is no Kafka broker here). The bundle is
the one `make bundle` builds.

A good bundle serves queries; a tampered, unsigned or wrongly signed one is refused by OPA,
and the gateway then reports not ready and answers every query with 503: fail closed.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from app.devstack import GatewayProcess, find_opa, free_port, start_gateway, wait_http
from tests.conftest import AUDIENCE, ISSUER, Keys
from tests.deploy.manifests import LAYOUTS, REPO, container, find, make_bundle, render

pytestmark = pytest.mark.integration

BUNDLE_TOKEN = "bundle-reader-token-for-tests"


class BundleServer:
    """A bundle service on 127.0.0.1 that serves one tarball to bearers of the right token."""

    def __init__(self, resource: str, body: bytes) -> None:
        self.requests: list[tuple[str, str | None]] = []
        self.body = body
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                auth = self.headers.get("authorization")
                server.requests.append((self.path, auth))
                if auth != f"Bearer {BUNDLE_TOKEN}":
                    status, payload = 401, b"unauthorized"
                elif self.path.lstrip("/") != resource:
                    status, payload = 404, b"not found"
                else:
                    status, payload = 200, server.body
                self.send_response(status)
                self.send_header("content-type", "application/gzip")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass
class Sidecars:
    """The OPA sidecar and the gateway, as the pod would run them."""

    opa: subprocess.Popen[bytes]
    opa_diagnostic: str
    opa_url: str
    opa_log: Path
    gateway: GatewayProcess
    bundles: BundleServer

    def stop(self) -> None:
        self.gateway.stop()
        if self.opa.poll() is None:
            self.opa.terminate()
            try:
                self.opa.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.opa.kill()
                self.opa.wait()
        self.bundles.stop()


@dataclass
class SigningKey:
    private_pem: Path
    public_pem: bytes


def new_signing_key(path: Path) -> SigningKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return SigningKey(path, public)


@pytest.fixture(scope="module")
def layout() -> list[dict[str, Any]]:
    """The prod overlay: the strictest settings a platform team ships."""
    return render(LAYOUTS["prod"])


@pytest.fixture(scope="module")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> SigningKey:
    return new_signing_key(tmp_path_factory.mktemp("keys") / "bundle-signing.pem")


@pytest.fixture(scope="module")
def signed_bundle(tmp_path_factory: pytest.TempPathFactory, signing_key: SigningKey) -> bytes:
    return make_bundle(tmp_path_factory.mktemp("bundle"), signing_key.private_pem).read_bytes()


def local_paths(text: str, mounts: dict[str, Path]) -> str:
    """Mount paths in ``text`` replaced by their local directories, in one pass."""
    pattern = "|".join(re.escape(m) for m in sorted(mounts, key=len, reverse=True))
    return re.sub(rf"({pattern})(?=/|$|\s)", lambda m: str(mounts[m.group(1)]), text, flags=re.M)


def start_sidecars(
    layout: list[dict[str, Any]],
    tmp: Path,
    bundle: bytes,
    verification_key: bytes,
    settings: dict[str, str],
    wait_ready: bool,
    poll_seconds: int | None = None,
) -> Sidecars:
    """Start the bundle server, OPA with the layout's args and config, then the gateway.

    ``poll_seconds`` shortens the bundle polling interval (the only change to the shipped
    config besides URLs and paths) for a test that publishes a second bundle.
    """
    opa_spec = container(layout, "opa")
    opa_config = find(layout, "ConfigMap", "querygate-opa-config-")["data"]
    config = yaml.safe_load(opa_config["opa-config.yaml"])
    [bundle_config] = config["bundles"].values()
    bundles = BundleServer(bundle_config["resource"], bundle)

    # Volumes as the kubelet would mount them: the ConfigMap (with the key an operator puts
    # in it) and the bundle-credentials Secret.
    mounts: dict[str, Path] = {}
    for mount in opa_spec["volumeMounts"]:
        local = tmp / mount["name"]
        local.mkdir(parents=True, exist_ok=True)
        mounts[mount["mountPath"]] = local
    config_dir = mounts["/config/opa"]
    for name, text in opa_config.items():
        (config_dir / name).write_text(local_paths(text, mounts))
    (config_dir / "bundle-verification-key.pem").write_bytes(verification_key)
    (mounts["/var/run/secrets/querygate/bundle"] / "token").write_text(BUNDLE_TOKEN)

    service_url = config["services"][bundle_config["service"]]["url"]
    config_file = config_dir / "opa-config.yaml"
    config_file.write_text(config_file.read_text().replace(service_url, bundles.url))
    if poll_seconds is not None:
        local = yaml.safe_load(config_file.read_text())
        for bundle_entry in local["bundles"].values():
            bundle_entry["polling"] = {"min_delay_seconds": poll_seconds,
                                       "max_delay_seconds": poll_seconds}
        config_file.write_text(yaml.safe_dump(local))

    opa_port, diagnostic_port = free_port(), free_port()
    args = []
    for arg in opa_spec["args"]:
        arg = local_paths(arg, mounts)
        if arg == "--addr=localhost:8181":
            arg = f"--addr=localhost:{opa_port}"
        elif arg.startswith("--diagnostic-addr="):
            arg = f"--diagnostic-addr=127.0.0.1:{diagnostic_port}"
        args.append(arg)
    opa_log = tmp / "opa.log"
    with opa_log.open("wb") as log:
        opa = subprocess.Popen(
            [find_opa(), *args], stdout=log, stderr=subprocess.STDOUT, cwd=tmp
        )
    diagnostic = f"http://127.0.0.1:{diagnostic_port}"
    try:
        try:
            wait_http(f"{diagnostic}/health", timeout_s=30)
        except Exception as exc:
            raise AssertionError(f"OPA did not start: {opa_log.read_text()[-2000:]}") from exc
        gateway_mounts: dict[str, Path] = {}
        for mount in container(layout, "querygate")["volumeMounts"]:
            gateway_mounts[mount["mountPath"]] = tmp / "querygate" / mount["name"]
            gateway_mounts[mount["mountPath"]].mkdir(parents=True, exist_ok=True)
        gateway_settings = {
            k.removeprefix("QUERYGATE_").lower(): local_paths(v, gateway_mounts)
            for k, v in find(layout, "ConfigMap", "querygate-config-")["data"].items()
        }
        assert gateway_settings["opa_url"] == "http://localhost:8181"
        gateway_settings["opa_url"] = f"http://localhost:{opa_port}"
        gateway_settings["host"] = "127.0.0.1"  # the test stays on loopback
        gateway_settings.pop("port")
        assert gateway_settings["metrics_port"] == "9090"  # its own port, as shipped
        gateway_settings["metrics_port"] = str(free_port())
        gateway_settings.update(settings)
        gateway = start_gateway(gateway_settings, tmp / "gateway.log", wait=wait_ready)
    except BaseException:
        opa.kill()
        opa.wait()
        bundles.stop()
        raise
    return Sidecars(opa, diagnostic, f"http://localhost:{opa_port}", opa_log, gateway, bundles)


@pytest.fixture(scope="module")
def secrets(postgres: Any, keys: Keys) -> dict[str, str]:
    """What the Secrets would hold (the identity as a static key from the test's IdP)."""
    return {
        "database_url": postgres.app_dsn,
        "mask_hmac_key": "sidecar-test-hmac-key-0123456789",
        "jwt_public_key": keys.public_pem,
        "jwt_issuer": ISSUER,
        "jwt_audience": AUDIENCE,
        "jwt_algorithms": "RS256",
        "opa_timeout_ms": "2000",
        # No Kafka broker here: the audit trail goes to the spool's JSONL file instead.
        "audit_sink": "file",
    }


@pytest.fixture(scope="module")
def good_sidecars(
    tmp_path_factory: pytest.TempPathFactory,
    layout: list[dict[str, Any]],
    signed_bundle: bytes,
    signing_key: SigningKey,
    secrets: dict[str, str],
) -> Iterator[Sidecars]:
    sidecars = start_sidecars(
        layout, tmp_path_factory.mktemp("good"), signed_bundle, signing_key.public_pem, secrets,
        wait_ready=True,
    )
    yield sidecars
    sidecars.stop()


def test_signed_bundle_is_activated_and_queries_work(good_sidecars: Sidecars, keys: Keys) -> None:
    assert httpx.get(f"{good_sidecars.opa_diagnostic}/health?bundles").status_code == 200
    assert httpx.get(f"{good_sidecars.gateway.url}/readyz").status_code == 200
    # OPA fetched the bundle with the token from the mounted credentials.
    assert ("/bundles/querygate.tar.gz", f"Bearer {BUNDLE_TOKEN}") in good_sidecars.bundles.requests

    alice = keys.headers("alice", ["analysts"])
    response = httpx.post(
        f"{good_sidecars.gateway.url}/v1/query", headers=alice,
        json={"sql": "SELECT id, country FROM customers WHERE id < $1", "params": [4]},
    )
    assert response.status_code == 200, response.text
    assert response.json()["row_count"] == 3
    denied = httpx.post(f"{good_sidecars.gateway.url}/v1/query", headers=alice,
                        json={"sql": "DROP TABLE orders"})
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "policy_denied"


def test_the_active_policy_is_the_built_revision(good_sidecars: Sidecars) -> None:
    # The decision API is only on loopback in the pod; here it is the test's loopback.
    bundles = httpx.get(f"{good_sidecars.opa_url}/v1/data/system/bundles").json()["result"]
    revision = bundles["querygate"]["manifest"]["revision"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout.strip()
    # A dirty checkout's revision also names a digest of its rego/: two dirty builds with
    # different policies must not share a revision (the decision cache keys on it).
    assert revision.split("-dirty-")[0] == head


def tampered(bundle: bytes) -> bytes:
    """The signed bundle with its data changed after signing: every group may write."""
    source = tarfile.open(fileobj=io.BytesIO(bundle))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as target:
        for member in source.getmembers():
            body = source.extractfile(member).read()  # type: ignore[union-attr]
            if member.name.lstrip("/") == "data.json":
                data = json.loads(body)
                data["querygate"]["config"]["writer_groups"].append("analysts")
                body = json.dumps(data).encode()
                member.size = len(body)
            target.addfile(member, io.BytesIO(body))
    return out.getvalue()


def unsigned(tmp: Path) -> bytes:
    out = tmp / "unsigned.tar.gz"
    subprocess.run(
        [find_opa(), "build", "--bundle", "rego/", "--ignore", "*_test.rego", "-o", str(out)],
        cwd=REPO, check=True, capture_output=True,
    )
    return out.read_bytes()


@pytest.mark.parametrize(("case", "refusal"), [
    ("tampered", "digest mismatch"),
    ("unsigned", "bundle missing .signatures.json"),
    ("signed_by_another_key", "failed to verify JWT signature"),
])
def test_bad_bundle_is_refused_and_the_gateway_fails_closed(
    case: str,
    refusal: str,
    tmp_path: Path,
    layout: list[dict[str, Any]],
    signed_bundle: bytes,
    signing_key: SigningKey,
    secrets: dict[str, str],
    keys: Keys,
    db: Any,
) -> None:
    if case == "tampered":
        bundle = tampered(signed_bundle)
    elif case == "unsigned":
        bundle = unsigned(tmp_path)
    else:
        other = new_signing_key(tmp_path / "other.pem")
        bundle = make_bundle(tmp_path / "other-bundle", other.private_pem).read_bytes()
    sidecars = start_sidecars(
        layout, tmp_path / "pod", bundle, signing_key.public_pem, secrets, wait_ready=False
    )
    try:
        # Wait until OPA has fetched and judged the bundle at least once.
        deadline = time.monotonic() + 20
        while "Bundle load failed" not in sidecars.opa_log.read_text():
            assert time.monotonic() < deadline, sidecars.opa_log.read_text()[-2000:]
            time.sleep(0.1)
        log = sidecars.opa_log.read_text()
        assert refusal in log
        assert "Bundle loaded and activated" not in log
        assert httpx.get(f"{sidecars.opa_diagnostic}/health?bundles").status_code != 200

        ready = httpx.get(f"{sidecars.gateway.url}/readyz")
        assert ready.status_code == 503
        assert ready.json()["error"]["code"] == "not_ready"

        # Denied, not run: not even with the write the tampered data would have allowed.
        before = db.fetchval("SELECT status FROM orders WHERE id = 1")
        for sql in ("SELECT id FROM customers WHERE id = 1",
                    "UPDATE orders SET status = 'sidecar-marker' WHERE id = 1"):
            response = httpx.post(f"{sidecars.gateway.url}/v1/query",
                                  headers=keys.headers("alice", ["analysts"]), json={"sql": sql})
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "policy_unavailable"
        # A value no other test writes, so "unchanged" cannot pass by accident.
        assert before != "sidecar-marker"
        assert db.fetchval("SELECT status FROM orders WHERE id = 1") == before
    finally:
        sidecars.stop()


def test_a_bad_update_keeps_the_last_verified_policy(
    tmp_path: Path,
    layout: list[dict[str, Any]],
    signed_bundle: bytes,
    signing_key: SigningKey,
    secrets: dict[str, str],
    keys: Keys,
) -> None:
    """A tampered bundle published over a good one is refused; running pods keep serving."""
    sidecars = start_sidecars(
        layout, tmp_path / "pod", signed_bundle, signing_key.public_pem, secrets,
        wait_ready=True, poll_seconds=1,
    )
    try:
        sidecars.bundles.body = tampered(signed_bundle)
        deadline = time.monotonic() + 20
        while "digest mismatch" not in sidecars.opa_log.read_text():
            assert time.monotonic() < deadline, sidecars.opa_log.read_text()[-2000:]
            time.sleep(0.1)
        assert httpx.get(f"{sidecars.gateway.url}/readyz").status_code == 200
        # Still the signed policy: analysts may not write.
        response = httpx.post(
            f"{sidecars.gateway.url}/v1/query", headers=keys.headers("alice", ["analysts"]),
            json={"sql": "UPDATE orders SET status = 'paid' WHERE id = 1"},
        )
        assert response.status_code == 403, response.text
        assert "write_requires_writer_group" in {r["rule"] for r in response.json()["error"]["reasons"]}
    finally:
        sidecars.stop()
