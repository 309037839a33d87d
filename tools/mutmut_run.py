#!/usr/bin/env python3
"""mutmut 3 over nodulekit, time-boxed and resumable, with a score per module (docs/testing.md).

mutmut writes its mutated copy (``mutants/``) and each mutant's result beside the code it
mutates. This script runs it in a scratch copy of the work tree (``--workdir``, kept between
runs; by default one per ``--module`` set, since mutmut resets every result of a copy whose
test selection changes), so

- a run stopped by the time box (``--time-box``) or Ctrl-C resumes where it stopped: mutmut
  keeps every finished mutant's result and re-tests only mutants of changed functions;
- ``--module`` narrows the run to some modules (mutmut's ``only_mutate``) and ``--tests`` to
  the test files that cover them, written into the copy's ``[tool.mutmut]``; without them it
  is the whole package against the whole suite, as ``pyproject.toml`` configures it;
- the report gives killed / (killed + survived + timeout) per module, the commit, and lists
  the survivors; survivors named in ``tools/mutmut-equivalent.toml`` (each with its reason)
  are equivalent and not counted;
- ``--rerun-survivors`` re-tests the survivors after new tests (mutmut keeps their result),
  ``--generate-only`` counts the mutants without running tests;
- ``--sample N --seed S`` tests a uniform random sample of N of the package's mutants (the
  whole package is days of CPU on two cores): the report gives the sample's score with a
  Wilson 95 % interval, an estimate of the whole package's; ``--exclude-sample S0`` draws
  from the mutants not in seed S0's sample, a fresh set after tests were written for S0's.

    python tools/mutmut_run.py --module nodulekit/geometry.py --tests tests/test_consensus.py
    python tools/mutmut_run.py --time-box 14400 -o mutmut-report.md    # the whole package
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tomllib
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutate import REPO, work_tree_files  # noqa: E402

EQUIVALENT = REPO / "tools" / "mutmut-equivalent.toml"
# mutmut's exit codes (mutmut.stats.status_by_exit_code), folded into what the score needs
OUTCOME = {1: "killed", 3: "killed", 0: "survived", 36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout"}
OUTCOME |= {255: "timeout", 5: "no tests", 33: "no tests", -11: "killed", -9: "killed", 37: "killed"}


# mutmut's generation step alone (what `mutmut run` does before its first test), to count the
# mutants of the whole package without hours of test runs; mutmut 3.8 has no command for it.
GENERATE = """
import sys
from pathlib import Path
import mutmut.__main__ as m
m.set_mutant_under_test("mutant_generation")
Path("mutants").mkdir(exist_ok=True)
m.copy_src_dir(); m.copy_also_copy_files(); m.setup_source_paths(); m.store_lines_covered_by_tests()
m.create_mutants(int(sys.argv[1]))
"""


def toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def configure(work: Path, modules: list[str], tests: list[str]) -> None:
    """Narrow the copy's [tool.mutmut] to ``modules`` and ``tests`` (empty: as configured)."""
    path = work / "pyproject.toml"
    text = path.read_text()
    if modules:
        text = text.replace("[tool.mutmut]\n", f"[tool.mutmut]\nonly_mutate = {toml_list(modules)}\n", 1)
    if tests:
        text = re.sub(
            r"pytest_add_cli_args_test_selection = \[.*\]",
            f"pytest_add_cli_args_test_selection = {toml_list(tests)}",
            text,
        )
    path.write_text(text)


def workdir_for(modules: list[str]) -> Path:
    """The default scratch copy for this module set: one per set, so that narrowing to other
    modules (and their tests) does not make mutmut reset the results of an earlier narrowing
    (mutmut re-runs every mutant when the configured test selection changes)."""
    name = "-".join(sorted(Path(m).with_suffix("").as_posix().replace("/", ".") for m in modules)) or "all"
    if len(name) > 80:  # many modules: a stable short name instead
        name = hashlib.sha1(name.encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "nodulekit" / "mutmut" / name


def sync(work: Path) -> None:
    """Copy the work tree into ``work``. A file is copied only when its content differs, and
    then gets the current time: mutmut regenerates the mutants of a source newer than its
    mutated copy, and a file copied with its old time (e.g. from another branch's tree) would
    leave that copy's stale mutants in place."""
    for name in work_tree_files():
        src, dst = REPO / name, work / name
        if src.is_file() and not (dst.is_file() and filecmp.cmp(src, dst, shallow=False)):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)


def results(work: Path) -> dict[str, dict[str, str]]:
    """{module: {mutant name: outcome}} from mutmut's per-file ``.meta`` files."""
    out: dict[str, dict[str, str]] = {}
    for meta in sorted((work / "mutants").rglob("*.py.meta")):
        module = str(meta.relative_to(work / "mutants"))[: -len(".meta")]
        codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
        out[module] = {
            name: OUTCOME.get(code, "not checked" if code is None else "suspicious") for name, code in codes.items()
        }
    return out


def equivalents() -> dict[str, str]:
    """{mutant name: why it is equivalent} from tools/mutmut-equivalent.toml."""
    return tomllib.loads(EQUIVALENT.read_text()).get("equivalent", {}) if EQUIVALENT.exists() else {}


def survivors_of(work: Path, modules: list[str]) -> list[str]:
    """Mutants of ``modules`` (all: empty) that survived and are not marked equivalent."""
    equivalent = equivalents()
    return [
        name
        for module, outcomes in results(work).items()
        if not modules or any(Path(module).match(m) or module == m for m in modules)
        for name, outcome in outcomes.items()
        if outcome == "survived" and name not in equivalent
    ]


def diff_of(work: Path, env: dict[str, str], name: str) -> str:
    """mutmut's diff of one mutant (what the reader needs to write the test that kills it)."""
    shown = subprocess.run(
        [sys.executable, "-m", "mutmut", "show", name], cwd=work, env=env, capture_output=True, text=True
    )
    return shown.stdout.strip() or shown.stderr.strip()


def sample_file(work: Path, seed: int) -> Path:
    return work / f"sample-seed{seed}.txt"


def draw_sample(work: Path, n: int, seed: int, exclude: list[int]) -> list[str]:
    """A seeded uniform sample of ``n`` mutant names of the generated package, minus the names
    of earlier samples (``exclude``: their seeds); written to ``sample-seed<S>.txt``."""
    names = sorted(name for outcomes in results(work).values() for name in outcomes)
    for earlier in exclude:
        taken = set(sample_file(work, earlier).read_text().split())
        names = [name for name in names if name not in taken]
    chosen = sorted(random.Random(seed).sample(names, min(n, len(names))))
    sample_file(work, seed).write_text("\n".join(chosen) + "\n")
    return chosen


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (a sample's share of killed mutants)."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return centre - half, centre + half


def sample_report(work: Path, seed: int, commit: str, command: str, env: dict[str, str] | None) -> tuple[str, int]:
    """The sample's outcomes per module and its score with a Wilson 95 % interval."""
    chosen = set(sample_file(work, seed).read_text().split())
    equivalent = equivalents()
    lines = [f"# mutmut sample report (seed {seed}, {len(chosen)} mutants)\n\ncommit `{commit}`; command `{command}`\n"]
    lines += [
        "| module | sampled | killed | survived | timeout | equivalent | no tests | not checked |",
        "|---|---|---|---|---|---|---|---|",
    ]
    total: Counter[str] = Counter()
    survivors: list[str] = []
    for module, outcomes in results(work).items():
        mine = {k: v for k, v in outcomes.items() if k in chosen}
        if not mine:
            continue
        n = Counter("equivalent" if v == "survived" and k in equivalent else v for k, v in mine.items())
        total += n
        survivors += [k for k, v in mine.items() if v == "survived" and k not in equivalent]
        lines.append(
            f"| {module} | {len(mine)} | {n['killed']} | {n['survived']} | {n['timeout']} | {n['equivalent']} | {n['no tests']} | {n['not checked']} |"
        )
    killed = total["killed"] + total["timeout"]
    scored = killed + total["survived"]
    low, high = wilson(killed, scored)
    lines += [
        "",
        f"**score {killed} / {scored} = {100 * killed / max(scored, 1):.1f} % (Wilson 95 % {100 * low:.1f}-{100 * high:.1f} %)**;"
        f" equivalent {total['equivalent']}, no tests {total['no tests']}, not checked {total['not checked']},"
        f" suspicious {total['suspicious']}",
        "",
        "## Survivors (not marked equivalent)",
        "",
    ]
    lines += [f"- `{s}`" if env is None else f"- `{s}`\n\n```diff\n{diff_of(work, env, s)}\n```\n" for s in survivors]
    return "\n".join(lines) + "\n", len(survivors)


def report(work: Path, modules: list[str], commit: str, command: str, env: dict[str, str] | None) -> tuple[str, int]:
    equivalent = equivalents()
    lines = [f"# mutmut report\n\ncommit `{commit}`; command `{command}`\n"]
    lines += [
        "| module | killed | survived | timeout | equivalent | no tests | not checked | score |",
        "|---|---|---|---|---|---|---|---|",
    ]
    survivors: list[str] = []
    reported: set[str] = set()
    for module, outcomes in results(work).items():
        if modules and not any(Path(module).match(m) or module == m for m in modules):
            continue
        n = Counter("equivalent" if outcomes[k] == "survived" and k in equivalent else v for k, v in outcomes.items())
        scored = n["killed"] + n["survived"] + n["timeout"]
        score = f"{100 * (n['killed'] + n['timeout']) / scored:.1f} %" if scored else "-"
        lines.append(
            f"| {module} | {n['killed']} | {n['survived']} | {n['timeout']} | {n['equivalent']} | {n['no tests']} | {n['not checked']} | {score} |"
        )
        survivors += [k for k, v in outcomes.items() if v == "survived" and k not in equivalent]
        reported |= set(outcomes)
    lines += ["", "## Survivors (not marked equivalent)", ""]
    if env is None:  # names only (mutmut's diffs take seconds each)
        lines += [f"- `{s}`" for s in survivors]
    else:
        lines += [f"- `{s}`\n\n```diff\n{diff_of(work, env, s)}\n```\n" for s in survivors]
    lines += ["", "## Equivalent (tools/mutmut-equivalent.toml)", ""]
    lines += [f"- `{k}`: {v}" for k, v in equivalent.items() if k in reported]
    return "\n".join(lines) + "\n", len(survivors)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--module", action="append", default=[], help="only mutate this module (repeatable)")
    ap.add_argument("--tests", action="append", default=[], help="test file run against the mutants (repeatable)")
    ap.add_argument("--workdir", type=Path, help="scratch copy (default: one per --module set, see workdir_for)")
    ap.add_argument("--time-box", type=float, default=3600, help="stop after this many seconds (resume later)")
    ap.add_argument("--max-children", type=int, default=2)
    ap.add_argument(
        "--rerun-survivors",
        action="store_true",
        help="re-test only the survivors of an earlier run (mutmut keeps a survivor's result when tests are"
        " added to a selected file); a run without it resumes the unchecked mutants",
    )
    ap.add_argument(
        "--generate-only",
        action="store_true",
        help="only generate the mutants (no test runs): the report counts them, all not checked",
    )
    ap.add_argument("--sample", type=int, help="test a seeded uniform random sample of this many mutants")
    ap.add_argument("--seed", type=int, default=1, help="the sample's seed")
    ap.add_argument(
        "--exclude-sample", type=int, action="append", default=[], help="leave out the mutants of this seed's sample"
    )
    ap.add_argument("--diffs", action="store_true", help="each survivor's diff in the report (seconds each)")
    ap.add_argument("--report-only", action="store_true", help="write the report of the results so far; run nothing")
    ap.add_argument("-o", "--output", type=Path, default=Path("mutmut-report.md"))
    args = ap.parse_args()

    work = (args.workdir or workdir_for(args.module)).resolve()
    # the commit whose code and tests this run copies (a resumed run keeps earlier results: see the docs)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "nodulekit", "tests"], cwd=REPO, capture_output=True, text=True
    ).stdout
    sync(work)
    configure(work, args.module, args.tests)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    shared = REPO.parent / "shared" / "data"
    if "NODULEKIT_SHARED_DATA" not in env and shared.exists():
        env["NODULEKIT_SHARED_DATA"] = str(shared)
    mutmut = [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children)]
    if args.rerun_survivors:
        # mutmut re-runs a mutant named on its command line even when it has a result
        rerun = survivors_of(work, args.module) if (work / "mutants").exists() else []
        if not rerun:
            print("no survivors to re-test")
            return 0
        mutmut += rerun
    if args.generate_only or args.sample:
        generate = [sys.executable, "-c", GENERATE, str(args.max_children)]
        if args.generate_only:
            mutmut = generate
        elif not args.report_only:
            subprocess.run(generate, cwd=work, env=env, check=True)
            if args.rerun_survivors:  # the sample's survivors only, after new tests
                rerun = set(survivors_of(work, args.module)) & set(sample_file(work, args.seed).read_text().split())
                if not rerun:
                    print("no survivors of the sample to re-test")
                    return 0
                mutmut = mutmut[:6] + sorted(rerun)
            else:
                mutmut += draw_sample(work, args.sample, args.seed, args.exclude_sample)
    try:
        if not args.report_only:
            subprocess.run(
                ["timeout", "--signal=INT", str(int(args.time_box)), *mutmut], cwd=work, env=env, check=False
            )
    except KeyboardInterrupt:
        pass
    command = "python tools/mutmut_run.py " + " ".join(sys.argv[1:])
    stamp = commit + (" (+ uncommitted changes)" if dirty.strip() else "")
    if args.sample:
        text, survivors = sample_report(work, args.seed, stamp, command, env if args.diffs else None)
    else:
        text, survivors = report(work, args.module, stamp, command, env if args.diffs else None)
    args.output.write_text(text)
    print(text)
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
