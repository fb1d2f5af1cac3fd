"""The command-line tool."""

import json
import subprocess
import sys

import edgelearn


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "edgelearn", *args], capture_output=True, text=True, timeout=300, **kw)


def test_info_prints_backend():
    r = run_cli("info")
    assert r.returncode == 0, r.stderr
    info = edgelearn.backend_info()
    assert info["kernel"] in r.stdout and "cpu_features" in r.stdout


def test_info_json_matches_backend_info():
    r = run_cli("info", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == edgelearn.backend_info()
