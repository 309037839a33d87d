#!/usr/bin/env python3
"""A seeded random sample of mutmut's mutants of the whole package, each run against the tests
that execute its function: an estimate of the whole package's mutation score (docs/testing.md).

mutmut's own run needs a stats pass of the whole suite in one process with every call traced
before its first mutant (over an hour on the shared 2-core machine, and it stops at the first
test that behaves differently under its tracing). This tool keeps mutmut's mutants and its way
of choosing tests, and gets the second from coverage instead:

1. ``tools/mutmut_run.py --generate-only`` (or any mutmut run) has generated the mutants in the
   scratch copy ``--workdir``; ``--sample N --seed S`` draws N of their names uniformly (or
   ``--names FILE`` gives them);
2. ``--coverage FILE`` is a coverage data file of the whole suite with one context per test
   (``pytest -n 2 --cov=nodulekit --cov-context=test``, see ``make mutate-sample``): a mutant
   is run against the tests whose context covers a line of its function (as mutmut's stats
   would pick them; a function reached only in child processes has *no tests*, as in mutmut);
3. each mutant's function is put in place of the original in a scratch copy of the work tree
   (``--jobs`` copies, one mutant at a time each) and those tests run with ``pytest -x``;
   failing = killed, passing = survived, past ``--timeout`` = timeout (counted as killed, as
   mutmut and ``tools/mutate.py`` count it);
4. the mutants run in a random order, so a run stopped by ``--time-box`` leaves a random part
   of the sample; results go to ``--results`` (JSON) as they come, and a second call resumes.

The report gives the score killed / (killed + survived) with a Wilson 95 % interval, per-module
counts, and each survivor with its diff; survivors named in tools/mutmut-equivalent.toml are
equivalent and left out of the score.

    python tools/mutant_sample.py --sample 240 --seed 1 --coverage .coverage -o mutant-sample.md
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutate import REPO, copy_repo  # noqa: E402
from mutmut_run import diff_of, equivalents, results, wilson, workdir_for  # noqa: E402

KILLED = ("killed", "timeout")


def split_name(name: str) -> tuple[str, str | None, str]:
    """(module file, class or None, function) of a mutmut mutant name such as
    ``nodulekit.run.xǁRunǁfold_result__mutmut_3`` or ``nodulekit.cli.x_main__mutmut_35``."""
    cut = max(name.rfind(".x_"), name.rfind(".xǁ"))
    module, mangled = name[:cut], name[cut + 1 :]
    base = mangled.rsplit("__mutmut_", 1)[0]
    cls, func = (base.split("ǁ")[1], base.split("ǁ")[2]) if base.startswith("xǁ") else (None, base[2:])
    path = Path(*module.split("."))
    path = path / "__init__.py" if (REPO / path).is_dir() else path.with_suffix(".py")
    return str(path), cls, func


def _function(tree: ast.Module, cls: str | None, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    body = tree.body
    if cls is not None:
        owner = next((n for n in body if isinstance(n, ast.ClassDef) and n.name == cls), None)
        body = owner.body if owner else []
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef)
    return next((n for n in body if isinstance(n, kinds) and n.name == name), None)


@functools.cache
def _parsed(path: Path) -> tuple[str, ast.Module]:
    """A module's text and syntax tree (mutmut's mutated modules are large: parse each once)."""
    text = path.read_text()
    return text, ast.parse(text)


def planted(source: str, mutants_file: Path, mutant: str, cls: str | None, func: str) -> tuple[str, tuple[int, int]]:
    """(the module with ``func`` replaced by mutmut's mutated copy, the original's line span)."""
    original = _function(ast.parse(source), cls, func)
    mangled = mutant.rsplit(".", 1)[1]
    mutants_source, mutants_tree = _parsed(mutants_file)
    mutated = _function(mutants_tree, cls, mangled)
    if original is None or mutated is None:
        raise LookupError(f"{mutant}: function not found")
    text = ast.get_source_segment(mutants_source, mutated).replace(f"def {mangled}(", f"def {func}(", 1)
    lines = source.splitlines(keepends=True)
    new = "".join(lines[: original.lineno - 1]) + " " * original.col_offset + text + "\n"
    return new + "".join(lines[original.end_lineno :]), (original.lineno, original.end_lineno)


def covering_tests(coverage_files: list[Path]) -> dict[str, dict[int, set[str]]]:
    """{module file: {line: test node ids (function level)}} from per-test coverage contexts (the
    union over several data files: the suite's run, and a run of only the tests written since)."""
    out: dict[str, dict[int, set[str]]] = {}
    for coverage_file in coverage_files:
        _add_covering_tests(out, coverage_file)
    return out


def _add_covering_tests(out: dict[str, dict[int, set[str]]], coverage_file: Path) -> None:
    from coverage import CoverageData

    data = CoverageData(basename=str(coverage_file))
    data.read()
    for measured in data.measured_files():
        rel = str(Path(measured).resolve()).split("/nodulekit/", 1)[-1]
        lines = out.setdefault(f"nodulekit/{rel}", {})
        for line, contexts in data.contexts_by_lineno(measured).items():
            tests = {c.split("|")[0].split("[")[0] for c in contexts if c}
            lines.setdefault(line, set()).update(tests)


def test_seconds(log: Path | None) -> dict[str, float]:
    """{test (function level): seconds} from a ``pytest --durations=0`` log (setup + call; a test
    it does not list took under 5 ms)."""
    seconds: dict[str, float] = {}
    for line in log.read_text().splitlines() if log else []:
        parts = line.split()
        if len(parts) == 3 and parts[0].endswith("s") and parts[1] in ("setup", "call", "teardown"):
            test = parts[2].split("[")[0]
            seconds[test] = seconds.get(test, 0.0) + float(parts[0][:-1])
    return seconds


def run_one(tree: Path, mutant: str, coverage: dict, timeout: float, env: dict, seconds: dict) -> dict:
    path, cls, func = split_name(mutant)
    source = (tree / path).read_text()  # the copy made at the start (the work tree may move on)
    try:
        new, (first, last) = planted(source, Path(env["MUTANTS"]) / path, mutant, cls, func)
    except LookupError as exc:
        return {"outcome": "not planted", "why": str(exc)}
    tests = set().union(*[coverage.get(path, {}).get(n, set()) for n in range(first, last + 1)])
    tests |= set(env.get("EXTRA_TESTS", "").split()) if tests else set()  # written after the coverage run
    if env.get("WIDEN") and tests:
        # whole files: a module-scoped fixture's calls are credited to the first test that built it
        tests = {t.split("::")[0] for t in tests}
    tests = sorted(tests, key=lambda t: (seconds.get(t, 0.0), t))  # fastest first, as mutmut: -x stops sooner
    if not tests:
        return {"outcome": "no tests"}
    target = tree / path
    target.write_text(new)
    start = time.monotonic()
    try:
        r = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=", *tests],
            cwd=tree, env={**env, "PYTHONPATH": str(tree)}, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        outcome = {0: "survived", 1: "killed", 2: "killed", 3: "killed"}.get(r.returncode, f"error rc={r.returncode}")
        failed = next((line for line in r.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))), "")
    except subprocess.TimeoutExpired:
        outcome, failed = "timeout", ""
    finally:
        target.write_text(source)
    return {"outcome": outcome, "tests": len(tests), "seconds": round(time.monotonic() - start, 1), "by": failed}


def run_sample(names: list[str], args, coverage: dict, done: dict) -> None:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "MUTANTS": str(args.workdir / "mutants")}
    env["EXTRA_TESTS"] = " ".join(args.extra_tests)
    env["WIDEN"] = "1" if args.widen else ""
    shared = REPO.parent / "shared" / "data"
    if "NODULEKIT_SHARED_DATA" not in env and shared.exists():
        env["NODULEKIT_SHARED_DATA"] = str(shared)
    trees = []
    for k in range(args.jobs):  # one scratch copy of the work tree per worker
        tree = args.scratch / f"tree{k}"
        shutil.rmtree(tree, ignore_errors=True)
        copy_repo(tree)
        trees.append(tree)
    free, lock, deadline = list(trees), threading.Lock(), time.monotonic() + args.time_box
    seconds = test_seconds(args.durations)

    def one(mutant: str) -> None:
        if time.monotonic() > deadline:
            return
        with lock:
            tree = free.pop()
        try:
            result = run_one(tree, mutant, coverage, args.timeout, env, seconds)
        finally:
            with lock:
                free.append(tree)
        with lock:
            done[mutant] = result
            args.results.write_text(json.dumps(done, indent=1, sort_keys=True))
            print(f"[{len(done)}/{len(names)}] {mutant}: {result['outcome']} {result.get('by', '')}", flush=True)

    equivalent = equivalents()
    rerun = {n for n, r in done.items() if args.rerun_survivors and r["outcome"] == "survived" and n not in equivalent}
    todo = [n for n in names if n not in done or n in rerun]
    random.Random(args.seed).shuffle(todo)  # a time-boxed run leaves a random part of the sample
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, todo))


def report(names: list[str], done: dict, args, commit: str) -> tuple[str, int]:
    equivalent = equivalents()
    outcome = {n: done.get(n, {"outcome": "not checked"})["outcome"] for n in names}
    outcome = {n: "equivalent" if o == "survived" and n in equivalent else o for n, o in outcome.items()}
    modules: dict[str, Counter] = {}
    for n, o in outcome.items():
        modules.setdefault(split_name(n)[0], Counter())[o] += 1
    total = Counter(outcome.values())
    killed = total["killed"] + total["timeout"]
    scored = killed + total["survived"]
    low, high = wilson(killed, scored)
    lines = [
        f"# Mutant sample: {len(names)} of mutmut's mutants of nodulekit/ (seed {args.seed})\n",
        f"commit `{commit}`; command `python tools/mutant_sample.py {' '.join(sys.argv[1:])}`\n",
        f"**score {killed} / {scored} = {100 * killed / max(scored, 1):.1f} % (Wilson 95 % {100 * low:.1f}-{100 * high:.1f} %)**;"
        f" timeouts {total['timeout']} (counted as killed), equivalent {total['equivalent']}, no tests {total['no tests']},"
        f" not checked {total['not checked']}, not run (tool errors) {sum(o.startswith(('error', 'not planted')) for o in outcome.values())}\n",
        "| module | sampled | killed | timeout | survived | equivalent | no tests | not checked |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for module, c in sorted(modules.items()):
        lines.append(
            f"| {module} | {sum(c.values())} | {c['killed']} | {c['timeout']} | {c['survived']} | {c['equivalent']} | {c['no tests']} | {c['not checked']} |"
        )
    survivors = [n for n, o in outcome.items() if o == "survived"]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    lines += ["", "## Survivors (not marked equivalent)", ""]
    for s in survivors:
        lines.append(f"- `{s}` ({done[s]['tests']} tests ran)\n\n```diff\n{diff_of(args.workdir, env, s)}\n```\n")
    other = {n: done[n] for n, o in outcome.items() if o.startswith(("error", "not planted"))}
    if other:
        lines += ["", "## Not run (tool errors)", ""] + [f"- `{n}`: {r}" for n, r in other.items()]
    return "\n".join(lines) + "\n", len(survivors)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=workdir_for([]), help="mutmut's scratch copy with the mutants")
    ap.add_argument("--sample", type=int, default=240, help="how many mutants to draw")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--names", type=Path, help="a file of mutant names instead of a drawn sample")
    ap.add_argument(
        "--coverage",
        type=Path,
        nargs="+",
        required=True,
        help="coverage data with one context per test (several: their union)",
    )
    ap.add_argument(
        "--module",
        nargs="*",
        default=[],
        help="draw only from these module files (e.g. nodulekit/stats.py nodulekit/sources/)",
    )
    ap.add_argument(
        "--durations", type=Path, help="a `pytest --durations=0` log: each mutant's tests run fastest first"
    )
    ap.add_argument(
        "--extra-tests",
        nargs="*",
        default=[],
        help="tests written after the coverage run, run too for every mutant that has covering tests",
    )
    ap.add_argument("--rerun-survivors", action="store_true", help="run the survivors again (after new tests)")
    ap.add_argument(
        "--widen",
        action="store_true",
        help="run the whole test files of the covering tests (with --rerun-survivors: a second look at survivors)",
    )
    ap.add_argument(
        "--exclude",
        type=Path,
        nargs="*",
        default=[],
        help="files of mutant names a drawn sample leaves out (an earlier sample)",
    )
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per mutant (then: timeout = killed)")
    ap.add_argument("--time-box", type=float, default=4 * 3600)
    ap.add_argument("--scratch", type=Path, default=Path.home() / ".cache" / "nodulekit" / "mutant-sample")
    ap.add_argument("--results", type=Path, help="results JSON (default: beside the scratch copies, per seed)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("-o", "--output", type=Path, default=Path("mutant-sample.md"))
    args = ap.parse_args()
    args.results = args.results or args.scratch / f"results-seed{args.seed}.json"
    args.scratch.mkdir(parents=True, exist_ok=True)
    if args.names:
        names = args.names.read_text().split()
    else:
        everything = sorted(n for outcomes in results(args.workdir).values() for n in outcomes)
        if args.module:  # a per-module sample: names whose module file starts with one given
            everything = [n for n in everything if split_name(n)[0].startswith(tuple(args.module))]
        if args.exclude:  # a fresh sample: none of an earlier one's mutants, for which tests were written
            earlier = {n for f in args.exclude for n in f.read_text().split()}
            everything = [n for n in everything if n not in earlier]
        names = sorted(random.Random(args.seed).sample(everything, min(args.sample, len(everything))))
    done = json.loads(args.results.read_text()) if args.results.exists() else {}
    if not args.report_only:
        run_sample(names, args, covering_tests(args.coverage), done)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    text, survivors = report(names, done, args, commit.stdout.strip())
    args.output.write_text(text)
    print(text)
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
