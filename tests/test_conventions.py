"""House conventions that no other test sees: the conda env of ``--sdm conda`` installs exactly
what ``make install`` does. (snakefmt and ``snakemake --lint`` run in ``make test`` itself.)"""

from __future__ import annotations

import re

import yaml

from tests.workflow_util import REPO

ENV = REPO / "envs" / "indextts.yaml"
LOCK = REPO / "requirements.lock"


def _lock_pins() -> list[str]:
    return [ln.strip() for ln in LOCK.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def _env_pip_pins(env: dict) -> list[str]:
    pip = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip) == 1, f"{ENV}: expected one pip: list, found {len(pip)}"
    return [str(p).strip() for p in pip[0]]


def test_conda_env_pins_equal_the_lock():
    env = yaml.safe_load(ENV.read_text())
    pins, lock = _env_pip_pins(env), _lock_pins()
    # No -r/-e lines: Snakemake copies the env file to .snakemake/conda/ before conda reads it, so
    # relative paths break, and it hashes only the file's content, so a pin must be written here.
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+\-]+", p) for p in pins), [p for p in pins if "==" not in p]
    missing, extra = sorted(set(lock) - set(pins)), sorted(set(pins) - set(lock))
    assert not missing and not extra, (
        f"{ENV} and {LOCK} disagree: missing from the env {missing}, not in the lock {extra}. "
        "Copy the lock's pins into the env's pip: list")
    assert len(pins) == len(set(pins))


def test_conda_env_python_matches_the_lock_and_the_package_is_installed_after_the_pins():
    env = yaml.safe_load(ENV.read_text())
    lock_python = re.search(r"Python (\d+\.\d+)", LOCK.read_text().splitlines()[0])
    assert lock_python, "requirements.lock's first line names the Python it was frozen with"
    assert f"python={lock_python.group(1)}" in env["dependencies"]
    post = ENV.with_name("indextts.post-deploy.sh")  # Snakemake runs <env>.post-deploy.sh after creating it
    text = post.read_text()
    assert text.startswith("#!") and "--no-deps -e" in text and "INDEXTTS_SOURCE" in text
    assert "INDEXTTS_SOURCE=" in (REPO / "rules" / "common.smk").read_text()

