#!/usr/bin/env python3
"""Mutation testing on demand: plant realistic bugs one at a time and see whether the tests notice.

Each mutant of the catalogue (``tools/mutants.toml``) replaces one exact snippet of one module
(an operator, a constant, a condition, an off-by-one, a removed call, ...) with a buggy one.
For every mutant this script

1. copies the repository (tracked and untracked, not ignored files) to a scratch folder once,
2. plants the mutant in the copy, runs the mutant's test files there (``pytest -x``) under a
   per-mutant timeout, and restores the file;
3. counts the mutant *killed* when a test fails (or the run times out), *survived* when every
   test passes; with ``--confirm`` a survivor is run against the whole suite before it counts.

A snippet that no longer occurs exactly once (the code moved) makes the mutant *stale*: it is
reported, not counted, and the exit status is 1 so the catalogue is kept up to date.
The mutation score is killed / (killed + survived). See docs/testing.md.

    python tools/mutate.py                               # every mutant
    python tools/mutate.py --module nodulekit/export.py  # mutants of some modules
    python tools/mutate.py --only gradcam-batch-mean -o mutation.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CATALOGUE = REPO / "tools" / "mutants.toml"


@dataclass
class Mutant:
    id: str
    file: str
    find: str
    replace: str
    what: str
    tests: list[str]
    outcome: str = ""  # killed, survived, timeout, stale
    seconds: float = 0.0
    failed: list[str] = field(default_factory=list)


def load_catalogue(path: Path) -> list[Mutant]:
    data = tomllib.loads(path.read_text())
    default_tests: dict[str, list[str]] = data.get("tests", {})
    mutants = []
    for entry in data["mutant"]:
        tests = entry.get("tests") or default_tests.get(entry["file"])
        if not tests:
            raise SystemExit(f"{path}: mutant {entry['id']} names no tests and {entry['file']} has no default")
        mutants.append(Mutant(entry["id"], entry["file"], entry["find"], entry["replace"], entry["what"], tests))
    ids = [m.id for m in mutants]
    if len(set(ids)) != len(ids):
        raise SystemExit(f"{path}: mutant ids repeat: {sorted({i for i in ids if ids.count(i) > 1})}")
    return mutants


def work_tree_files() -> list[str]:
    """The work tree's files as git sees them (tracked + untracked, minus ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    return [name.decode() for name in listed if name]


def copy_repo(dest: Path) -> None:
    """The work tree as git sees it (tracked + untracked, minus ignored), without .venv or caches."""
    for name in work_tree_files():
        src = REPO / name
        if src.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def run_pytest(root: Path, tests: list[str], timeout: float, stop_first: bool = True) -> tuple[str, float, list[str]]:
    """('passed' | 'failed' | 'timeout', seconds, failing test ids) of pytest over ``tests`` in ``root``.

    The whole suite (``tests``) runs on two workers like ``make test``; test files run in one process.
    """
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rfE"]
    args += ["-n", "2", "--dist", "loadfile", "--no-loadscope-reorder"] if tests == ["tests"] else []
    args += (["-x"] if stop_first else []) + tests
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    # The copy has no ../shared beside it: point the real-data tests at the repository's.
    shared = REPO.parent / "shared" / "data"
    if "NODULEKIT_SHARED_DATA" not in env and shared.exists():
        env["NODULEKIT_SHARED_DATA"] = str(shared)
    start = time.monotonic()
    proc = subprocess.Popen(
        args, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "timeout", time.monotonic() - start, []
    seconds = time.monotonic() - start
    failed = [line.split(" ", 2)[1] for line in out.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    if proc.returncode == 0:
        return "passed", seconds, []
    if proc.returncode in (1, 2) and (failed or "error" in out.lower()):
        return "failed", seconds, failed
    raise SystemExit(f"pytest could not run {tests} (exit {proc.returncode}):\n{out[-3000:]}")


def check_import_location(root: Path) -> None:
    """The copy's nodulekit must be the one imported (not the editable install of the repo)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    found = subprocess.run(
        [sys.executable, "-c", "import nodulekit; print(nodulekit.__file__)"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(found).resolve().is_relative_to(root.resolve()):
        raise SystemExit(f"the mutated copy is not what Python imports ({found}); cannot mutation-test")


def plant(root: Path, mutant: Mutant) -> str | None:
    """Write the mutant into the copy; returns the original text, or None when the snippet is stale.

    A mutant that is not valid Python is a catalogue error (it would be "killed" by any import).
    """
    path = root / mutant.file
    if not path.exists():
        return None
    original = path.read_text()
    if original.count(mutant.find) != 1:
        return None
    mutated = original.replace(mutant.find, mutant.replace)
    try:
        compile(mutated, str(path), "exec")
    except SyntaxError as exc:
        raise SystemExit(f"mutant {mutant.id} is not valid Python ({exc}); fix the catalogue") from None
    path.write_text(mutated)
    return original


def run_mutants(root: Path, mutants: list[Mutant], timeout: float, confirm: bool, full_timeout: float) -> None:
    for i, m in enumerate(mutants, 1):
        original = plant(root, m)
        if original is None:
            m.outcome = "stale"
        else:
            try:
                result, m.seconds, m.failed = run_pytest(root, m.tests, timeout)
                if result == "passed" and confirm:
                    result, extra, m.failed = run_pytest(root, ["tests"], full_timeout, stop_first=True)
                    m.seconds += extra
                m.outcome = {"passed": "survived", "failed": "killed", "timeout": "timeout"}[result]
            finally:
                (root / m.file).write_text(original)
        print(f"[{i}/{len(mutants)}] {m.outcome:8s} {m.seconds:6.1f}s {m.id}: {m.what}", flush=True)


def report(mutants: list[Mutant], command: str) -> str:
    killed = [m for m in mutants if m.outcome in ("killed", "timeout")]
    survived = [m for m in mutants if m.outcome == "survived"]
    stale = [m for m in mutants if m.outcome == "stale"]
    counted = len(killed) + len(survived)
    score = 100.0 * len(killed) / counted if counted else float("nan")
    lines = [
        "# Mutation run",
        "",
        f"- command: `{command}`",
        f"- commit: {git_commit()}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"- mutants: {len(mutants)}; killed {len(killed)} (of which timeouts "
        f"{sum(m.outcome == 'timeout' for m in mutants)}), survived {len(survived)}, stale {len(stale)}",
        f"- **mutation score: {len(killed)}/{counted} = {score:.1f} %**",
        "",
        "| mutant | module | outcome | s | what | killed by |",
        "|---|---|---|---|---|---|",
    ]
    for m in mutants:
        by = ", ".join(m.failed[:2]) + (" ..." if len(m.failed) > 2 else "")
        lines.append(f"| {m.id} | {m.file} | {m.outcome} | {m.seconds:.0f} | {m.what} | {by} |")
    return "\n".join(lines) + "\n"


def git_commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True)
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalogue", type=Path, default=CATALOGUE)
    parser.add_argument("--module", action="append", default=[], help="only mutants of this file (repeatable)")
    parser.add_argument("--only", nargs="+", default=[], help="only these mutant ids")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutant's test run (default 600)")
    parser.add_argument("--confirm", action="store_true", help="run the whole suite on each survivor")
    parser.add_argument("--list", action="store_true", help="list the selected mutants and exit")
    parser.add_argument("-o", "--output", type=Path, help="write the Markdown report (and .json beside it) here")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy (its path is printed)")
    args = parser.parse_args(argv)

    mutants = load_catalogue(args.catalogue)
    if args.module:
        mutants = [m for m in mutants if m.file in args.module]
    if args.only:
        unknown = sorted(set(args.only) - {m.id for m in mutants})
        if unknown:
            raise SystemExit(f"unknown mutant id(s): {', '.join(unknown)}")
        mutants = [m for m in mutants if m.id in args.only]
    if not mutants:
        raise SystemExit("no mutants selected")
    for m in mutants:
        missing = [t for t in m.tests if not (REPO / t.split("::")[0]).exists()]
        if len(missing) == len(m.tests):
            raise SystemExit(f"mutant {m.id}: none of its test files exist ({', '.join(missing)})")
        if missing:
            print(f"warning: mutant {m.id}: no test file {', '.join(missing)}", file=sys.stderr)
        m.tests = [t for t in m.tests if t not in missing]
    if args.list:
        for m in mutants:
            print(f"{m.id:40s} {m.file:32s} {m.what}")
        return 0
    root = Path(tempfile.mkdtemp(prefix="nodulekit-mutate-"))
    try:
        copy_repo(root)
        check_import_location(root)
        tests = sorted({t.split("::")[0] for m in mutants for t in m.tests})
        result, seconds, failed = run_pytest(root, tests, args.timeout * 3, stop_first=False)
        print(f"baseline: {len(tests)} test files {result} in {seconds:.0f} s", flush=True)
        if result != "passed":
            raise SystemExit(f"the unmutated tests do not pass ({result}: {failed}); fix them first")
        run_mutants(root, mutants, args.timeout, args.confirm, args.timeout * 3)
    finally:
        if args.keep:
            print(f"scratch copy kept at {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    text = report(mutants, "python tools/mutate.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(text)
    if args.output:
        args.output.write_text(text)
        rows = [{k: v for k, v in vars(m).items() if k not in ("find", "replace")} for m in mutants]
        args.output.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return 1 if any(m.outcome == "stale" for m in mutants) else 0


if __name__ == "__main__":
    sys.exit(main())
