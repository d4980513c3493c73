"""The CLI's edges: --version, and errors as one line with a stable exit code (README),
never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from app import cli
from app.devstack import free_port


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True,
                          text=True, timeout=60)


def test_version():
    done = run("--version")
    assert done.returncode == 0
    assert done.stdout.startswith("querygate ") and done.stdout.split()[1][0].isdigit(), done


@pytest.mark.parametrize("params", ["[1,", "{\"a\": 1}"])
def test_params_that_are_not_a_json_list_are_a_usage_error(params):
    done = run("explain", "--sql", "SELECT 1", "--params", params, "--token", "t")
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr and "--params" in done.stderr, done.stderr


@pytest.mark.parametrize("command", [
    ["explain", "--sql", "SELECT 1", "--token", "t"],
    ["catalog", "--token", "t"],
])
def test_a_gateway_that_is_not_there_is_one_line_and_exit_3(command):
    url = f"http://127.0.0.1:{free_port()}"
    done = run(*command, "--url", url)
    assert done.returncode == cli.EXIT_UNREACHABLE, done
    assert "Traceback" not in done.stderr, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "cannot reach" in line and url in line and "ConnectError" in line, line
