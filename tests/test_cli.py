"""The command-line dispatcher (``indextts <command>``)."""

from __future__ import annotations

import os
import subprocess
import sys

from indextts import cli

# Run in a fresh interpreter: records the environment variable's value at the moment polars is
# first imported, after importing the CLI (which must not load polars or pyarrow itself).
_SPY = """
import importlib.abc, os, sys
seen = []
class Spy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "polars" and not seen:
            seen.append(os.environ.get({key!r}, "<unset>"))
sys.meta_path.insert(0, Spy())
import indextts.cli as c
assert "polars" not in sys.modules and "pyarrow" not in sys.modules, "importing indextts.cli loaded polars/pyarrow"
try:
    c.main(["clean-manifest", "--help"])
except SystemExit:
    pass
print("polars loaded with", seen[0] if seen else "<polars never loaded>")
"""


def test_command_environment_is_set_before_polars_loads(monkeypatch):
    # clean-manifest's allocator setting (cli.COMMAND_ENV) is read by polars' jemalloc when polars
    # loads, so the CLI sets it before importing the command's module. A variable the user set wins.
    env = cli.COMMAND_ENV["clean-manifest"]
    for key, value in env.items():
        clean = {k: v for k, v in os.environ.items() if k != key}
        r = subprocess.run([sys.executable, "-c", _SPY.format(key=key)], capture_output=True, text=True, env=clean)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().splitlines()[-1] == f"polars loaded with {value}"
        r = subprocess.run([sys.executable, "-c", _SPY.format(key=key)], capture_output=True, text=True, env={**clean, key: "narenas:1"})
        assert r.stdout.strip().splitlines()[-1] == "polars loaded with narenas:1"
        monkeypatch.delenv(key, raising=False)
        cli.apply_command_env("train")  # a command without settings sets nothing
        assert key not in os.environ
