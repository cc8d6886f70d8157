"""House conventions that no other test sees: the conda env of ``--sdm conda`` installs exactly
what ``make install`` does, and the library's modules import each other without a circle, the
model and audio packages below the pipeline. (snakefmt and ``snakemake --lint`` run in
``make test`` itself.)"""

from __future__ import annotations

import ast
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


def _import_graph() -> dict[str, set[str]]:
    """Module -> the ``indextts`` modules it imports anywhere in its source (function-level
    imports included: a lazy import is still a dependency)."""
    pkg = REPO / "indextts"
    mods = {}
    for f in pkg.rglob("*.py"):
        name = ".".join(f.relative_to(REPO).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = f
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("indextts"):
                graph[m] |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods}
                graph[m] |= {node.module} & set(mods)
            elif isinstance(node, ast.Import):
                graph[m] |= {a.name for a in node.names if a.name in mods}
    return {m: deps - {m} for m, deps in graph.items()}


def test_library_modules_import_each_other_without_a_circle():
    graph = _import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                circle = path[path.index(dep):] + [dep]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if dep not in state:
                visit(dep, path + [dep])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_audio_and_model_packages_stay_below_the_pipeline():
    """indextts.audio (one module per released audio model) and indextts.model import only each
    other and the two small helpers (config errors, atomic files): no extraction, training, synthesis
    or CLI."""
    for m, deps in _import_graph().items():
        for pkg in ("indextts.audio", "indextts.model"):
            if m == pkg or m.startswith(pkg + "."):
                ok = {"indextts.config", "indextts.files"} | ({"indextts.features"} if pkg == "indextts.model" else set())
                bad = sorted(d for d in deps if not d.startswith(pkg) and d not in ok)
                assert not bad, f"{m} imports {bad}; {pkg} may import only itself and {sorted(ok)}"
