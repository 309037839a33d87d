#!/usr/bin/env python
"""Nested cross-validation of the training recipe: the candidate an honest protocol picks, and how it scores.

Choosing the recipe with the best test-fold AUC uses the test folds to choose, so its AUC
cannot be claimed. Here the choice for each outer fold is made by
``nodulekit.training.nested_selection``: every candidate trains on ``--n-inner``
patient-grouped folds of that outer fold's training part, and the candidate with the highest
pooled inner AUC is chosen (ties: the first listed). The outer test fold is removed before
anything is trained or scored, so it cannot influence the choice.

The nested model's outer test predictions are the chosen candidate's own predictions from its
outer run: that run trained the candidate on the whole training part of the outer fold, with
the same settings and seed, and tested it on the outer fold, which is exactly "retrain the
chosen candidate on the training part". Before reusing anything the script checks that: the
candidate runs share the dataset (images, labels, masks, folds) and every setting but the
recipe, and each outer fold result holds the dataset's test fold and was trained on exactly
the rows outside it (with the same seed and number of epochs). The inner runs use the same
settings, read from the runs' run.json.

Inner runs live in WORKDIR/outer<k>/<NAME>/fold<j>: a re-run retrains nothing that finished
and resumes an interrupted fold from its checkpoint; WORKDIR/nested.json records what they
were trained with, and a re-run with other settings is refused. Each outer fold is claimed
while it trains, so several jobs may share a WORKDIR with different ``--outer-folds``.

The report (``-o REPORT.md``, plus REPORT.json) gives per outer fold the inner AUC of every
candidate and the choice, then the pooled nested model beside every fixed candidate and the
nine-feature logistic baseline (feature_baseline.py): accuracy, sensitivity, specificity, AUC
with 95 % patient-bootstrap intervals, Brier, ECE, and DeLong against the nested model with
Holm's adjustment (the table helper of recipe_compare.py).

    python benchmarks/nested_recipe.py /work/data/d11c.h5 \\
        paper=/work/data/runs/hesam-paper-w8 robust=/work/data/runs/hesam-robust-w8 \\
        --workdir /work/data/runs/nested-hesam-w8 -o nested-hesam-w8.md
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from execution_cost import _commit  # noqa: E402
from feature_baseline import cross_validated, feature_table  # noqa: E402
from recipe_compare import comparison, finished_predictions, markdown_table  # noqa: E402

RECORD = "nested.json"
RECORD_FORMAT = 1
# run.json entries that are no training setting: the recipe (compared on its own), when/how/where
# it ran, and what describes the dataset (its identity is compared with the dataset's instead)
NOT_SETTINGS = ("recipe", "command", "created", "versions", "execution", "dataset", "input_spec")
# settings older run.json files lack, with the value training used then
DEFAULTS = {"last_batch": "keep", "cuda_graphs": False, "compile": False}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass
class Candidate:
    name: str
    rundir: Path
    run: dict
    recipe: object  # nodulekit.recipes.Recipe


# ----------------------------------------------------------------------------- candidates and their runs


def parse_candidates(specs: list[str]) -> list[tuple[str, Path]]:
    """NAME=RUNDIR pairs; names become folder names in WORKDIR."""
    from nodulekit.errors import NodulekitError

    out = []
    for spec in specs:
        name, sep, rundir = spec.partition("=")
        if not sep or not rundir or not NAME.match(name):
            raise NodulekitError(f"candidate {spec!r} is not NAME=RUNDIR (NAME: letters, digits, _ . + -)")
        if name == "nested":
            raise NodulekitError("candidate name 'nested' is taken by the nested model; choose another")
        if name in dict(out):
            raise NodulekitError(f"candidate name {name!r} is given twice")
        out.append((name, Path(rundir)))
    if len(out) < 2:
        raise NodulekitError("nested selection needs at least two candidates (NAME=RUNDIR ...)")
    return out


def settings(run: dict) -> dict:
    """Everything a run.json fixes about training but the recipe; of its execution record, the variant (bf16 or not)."""
    out = {k: v for k, v in run.items() if k not in NOT_SETTINGS}
    out.update({k: run.get(k, v) for k, v in DEFAULTS.items()})
    out["execution.variant"] = (run.get("execution") or {}).get("variant")
    return out


def load_candidates(specs: list[str], ds) -> list[Candidate]:
    """Read and check the candidates' runs: same dataset and folds as ``ds``, same settings but the recipe."""
    from nodulekit.errors import NodulekitError
    from nodulekit.recipes import recipe_from_record
    from nodulekit.run import Run

    cands = []
    for name, rundir in parse_candidates(specs):
        run = Run(rundir)  # one line if it is not a run folder
        run.check_dataset(ds)  # images, labels, masks and fold assignment
        cands.append(Candidate(name, rundir, run.record, recipe_from_record(run.record.get("recipe"))))
    first = settings(cands[0].run)
    for c in cands[1:]:
        other = settings(c.run)
        for key in sorted(set(first) | set(other)):
            if first.get(key) != other.get(key):
                raise NodulekitError(
                    f"{c.rundir} differs from {cands[0].rundir} in {key} ({json.dumps(other.get(key))} vs "
                    f"{json.dumps(first.get(key))}); the candidates must share every setting but the recipe"
                )
    return cands


def train_config(run: dict, rundir: Path, device: str | None):
    """The TrainConfig a run.json records (the recipe included); ``device`` overrides the recorded one."""
    from nodulekit.errors import NodulekitError
    from nodulekit.recipes import recipe_from_record
    from nodulekit.training import TrainConfig

    try:
        opt, sched, sel = run["optimiser"], run["scheduler"], run["selection"]
        cfg = TrainConfig(
            arch=run["arch"],
            model_options=dict(run["model_options"]),
            epochs=int(run["epochs"]),
            batch_size=int(run["batch_size"]),
            last_batch=run.get("last_batch", DEFAULTS["last_batch"]),
            lr=float(opt["lr"]),
            momentum=float(opt["momentum"]),
            weight_decay=float(opt["weight_decay"]),
            lr_step=int(sched["step_size"]),
            lr_gamma=float(sched["gamma"]),
            seed=int(run["seed"]),
            select=sel["mode"],
            val_fraction=float(sel.get("val_fraction", 0.1)),
            device=device or run["device"],
            amp=bool(run["amp"]),
            channels_last=bool(run["channels_last"]),
            compile=bool(run.get("compile", False)),
            cuda_graphs=bool(run.get("cuda_graphs", False)),
            recipe=recipe_from_record(run.get("recipe")),
        )
    except (KeyError, TypeError) as exc:
        raise NodulekitError(f"{rundir}/run.json lacks the training setting {exc}") from None
    cfg.validate()
    return cfg


def _plain(record: dict) -> dict:
    return json.loads(json.dumps(record, default=str))


def check_reproduces(c: Candidate, cfg, ds) -> None:
    """Refuse a run whose settings ``cfg`` (what the inner runs train with) does not reproduce."""
    from nodulekit.errors import NodulekitError
    from nodulekit.training import resolve_device, run_record

    again = _plain(run_record(cfg, ds, resolve_device(cfg.device)))
    want, got = (
        _plain(settings(c.run)) | {"recipe": c.run.get("recipe")},
        settings(again) | {"recipe": again.get("recipe")},
    )
    want.pop("device"), got.pop("device")  # --device may move the inner runs
    for key in sorted(set(want) | set(got)):
        if want.get(key) != got.get(key):
            raise NodulekitError(
                f"{c.rundir}/run.json: its {key} ({json.dumps(want.get(key))}) cannot be reproduced for the inner runs "
                f"(would be {json.dumps(got.get(key))})"
            )


def _reuse_problem(res, ds, k: int, cfg) -> str | None:
    """Why fold result ``res`` is not "the candidate trained on fold k's training part", or None."""
    if not np.array_equal(np.sort(res.test_index), np.flatnonzero(ds.fold == k)):
        return "its test rows are not the dataset's fold"
    if res.train_index is None:
        return "it records no training rows"
    val = [] if res.val_index is None else res.val_index
    if not np.array_equal(
        np.sort(np.concatenate([res.train_index, val])).astype(np.int64), np.flatnonzero(ds.fold != k)
    ):
        return "it was not trained on exactly the rows outside the fold"
    raw = res.attrs.get("run")
    seed = (json.loads(raw) if isinstance(raw, str) else raw or {}).get("seed")
    if seed != cfg.seed:
        return f"it was trained with seed {seed}, not {cfg.seed}"
    if res.epochs != cfg.epochs:
        return f"it was trained for {res.epochs} epochs, not {cfg.epochs}"
    return None


def check_outer_fold(c: Candidate, ds, k: int, cfg) -> np.ndarray:
    """The outer test probabilities of fold ``k`` of candidate ``c`` (dataset row order), once checked
    to be what training the candidate on the whole training part of fold ``k`` gives."""
    from nodulekit.errors import NodulekitError
    from nodulekit.run import Run

    res = Run(c.rundir).fold_result(k)  # one line if the fold is not finished
    problem = _reuse_problem(res, ds, k, cfg)
    if problem:
        raise NodulekitError(
            f"{c.rundir} fold {k} cannot stand for the candidate trained on fold {k}'s training part: {problem}"
        )
    prob = np.full(len(ds.y), np.nan)
    prob[np.asarray(res.test_index)] = res.test_prob
    return prob[np.flatnonzero(ds.fold == k)]


# ----------------------------------------------------------------------------- WORKDIR


def workdir_record(ds, cands: list[Candidate], cfg, n_inner: int, seed: int) -> dict:
    return {
        "format": RECORD_FORMAT,
        "dataset_identity": ds.identity,
        "n_inner": n_inner,
        "inner_split_seed": seed,
        "settings": _plain(settings(cands[0].run)),
        "device": str(cfg.device),
        "candidates": {c.name: c.recipe.as_dict() for c in cands},
    }


def claim_workdir(workdir: Path, wanted: dict) -> None:
    """Refuse a WORKDIR whose inner runs were trained otherwise; record the candidates (atomically)."""
    from nodulekit.errors import NodulekitError
    from nodulekit.outputs import atomic_path

    path = workdir / RECORD
    merged = dict(wanted)
    if path.exists():
        try:
            held = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise NodulekitError(f"{path} cannot be read ({exc}); use a new --workdir") from None
        for key in ("format", "dataset_identity", "n_inner", "inner_split_seed", "settings", "device"):
            if held.get(key) != wanted[key]:
                raise NodulekitError(
                    f"{workdir} holds inner runs made with another {key} ({json.dumps(held.get(key))[:120]}); "
                    "use a new --workdir (or the settings it was made with)"
                )
        for name, recipe in wanted["candidates"].items():
            if name in held["candidates"] and held["candidates"][name] != recipe:
                raise NodulekitError(
                    f"{workdir} holds inner runs of another recipe named {name!r} "
                    f"({held['candidates'][name].get('name')}); rename the candidate or use a new --workdir"
                )
        merged["candidates"] = {**held["candidates"], **wanted["candidates"]}
    workdir.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(merged, indent=1) + "\n")


def finished_inner(workdir: Path, k: int, names: list[str], n_inner: int) -> int:
    """Inner folds of outer fold ``k`` already finished (a result is written only once a fold is)."""
    return sum((workdir / f"outer{k}" / n / f"fold{j}" / "result.h5").exists() for n in names for j in range(n_inner))


# ----------------------------------------------------------------------------- the nested choice


def choose(ds, k: int, cands: list[Candidate], cfg, workdir: Path, n_inner: int, seed: int) -> dict:
    """Outer fold ``k``'s choice: nested_selection on its training part (the outer test rows never reach it)."""
    from nodulekit import claims
    from nodulekit.training import nested_selection

    names = [c.name for c in cands]
    before = finished_inner(workdir, k, names, n_inner)
    with claims.claimed([workdir / f"outer{k}"]):
        choice = nested_selection(ds, k, {c.name: c.recipe for c in cands}, cfg, workdir, n_inner=n_inner, seed=seed)
    return choice | {"inner_reused": before, "inner_trained": len(names) * n_inner - before}


def nested_predictions(ds, choices: list[dict], outer: dict[str, dict[int, np.ndarray]]) -> np.ndarray:
    """Per dataset row of the outer folds chosen: the chosen candidate's outer-run probability."""
    prob = np.full(len(ds.y), np.nan)
    for ch in choices:
        prob[ds.fold == ch["outer_fold"]] = outer[ch["chosen"]][ch["outer_fold"]]
    return prob


def time_one(ds, c: Candidate, cfg, outer_fold: int, n_outer: int, n_cands: int, n_inner: int, seed: int) -> str:
    """Train inner fold 0 of ``outer_fold`` for candidate ``c`` in a temporary folder (nothing kept);
    its wall time, and the whole nested run's if every inner fold cost as much."""
    import tempfile

    from nodulekit.recipes import inner_dataset
    from nodulekit.training import resolve_device, run_record, train_fold

    inner = inner_dataset(ds, outer_fold, n_inner, seed)
    run = run_record(cfg, inner, resolve_device(cfg.device))
    with tempfile.TemporaryDirectory(prefix="nested-time-") as tmp:
        started = time.perf_counter()
        train_fold(inner, cfg, 0, tmp, run=run, progress=False)
        seconds = time.perf_counter() - started
    total = n_outer * n_cands * n_inner
    return (
        f"one inner fold of {c.name} (outer fold {outer_fold}, inner fold 0: {int((inner.fold != 0).sum())} training "
        f"nodules, {cfg.epochs} epochs, on {cfg.device}): {seconds:.1f} s; the nested run trains {n_outer} outer x "
        f"{n_cands} candidates x {n_inner} inner = {total} inner folds: about {total * seconds / 60:.0f} min at this cost"
    )


# ----------------------------------------------------------------------------- report


def fold_table(choices: list[dict], names: list[str]) -> str:
    lines = [
        "| outer fold | test nodules | "
        + " | ".join(f"inner AUC {n}" for n in names)
        + " | chosen | inner folds reused |",
        "|---" * (len(names) + 4) + "|",
    ]
    for ch in choices:
        k = ch["outer_fold"]
        scores = " | ".join(f"{ch['scores'][n]:.3f}" for n in names)
        total = ch["inner_reused"] + ch["inner_trained"]
        lines.append(f"| {k} | {ch['n_test']} | {scores} | **{ch['chosen']}** | {ch['inner_reused']} of {total} |")
    return "\n".join(lines)


def markdown(report: dict, pooled_table: str) -> str:
    names = list(report["candidates"])
    cand_lines = "\n".join(
        f"| {n} | `{c['rundir']}` | {c['recipe']['name']} |" for n, c in report["candidates"].items()
    )
    s = report["settings"]
    counts = ", ".join(f"{n} {report['times_chosen'][n]}" for n in names)
    return f"""# Nested selection of the training recipe: {report["dataset"]["name"]}

Dataset `{report["dataset"]["path"]}` ({report["dataset"]["n"]} nodules); outer folds {report["outer_folds"]}
({report["pooled"]["n_nodules"]} test nodules, {report["pooled"]["n_patients"]} patients). Shared settings: {s["arch"]}
{json.dumps(s["model_options"])}, {s["epochs"]} epoch(s), batch {s["batch_size"]}, lr {s["optimiser"]["lr"]} × {s["scheduler"]["gamma"]:g}
every {s["scheduler"]["step_size"]} epochs, seed {s["seed"]}, bf16 autocast {s["amp"]}; inner runs on {report["device"]}.

| candidate | outer run | recipe |
|---|---|---|
{cand_lines}

## Choice per outer fold

Each candidate trained on {report["n_inner"]} patient-grouped inner folds of the outer fold's
training part (inner split seed {report["inner_split_seed"]}); inner AUC = pooled AUC of its inner
test predictions; the highest is chosen. The outer test fold is removed before anything is trained.

{fold_table(report["folds"], names)}

Times chosen: {counts}.

## Pooled outer test predictions

{report["reuse"]}

{pooled_table}

DeLong tests the nested model's AUC against each fixed model's; Holm adjusts over the
{len(report["comparisons"]["pairs"])} comparisons. Intervals: 95 % patient bootstrap ({report["bootstrap"]} resamples).

Command: `{report["command"]}`; commit {report["commit"]}; {report["machine"]}; {report["elapsed_s"]:.0f} s
({report["inner_trained"]} inner folds trained, {report["inner_reused"]} reused).
"""


def build_report(args, ds, cands, cfg, choices, rows, models, started: tuple[float, str]) -> tuple[dict, str]:
    """``started``: (perf_counter, commit) when the run began."""
    from nodulekit.execution import machine_info

    y, patients = ds.y[rows], ds.patient_id[rows]
    pairs = [("nested", n) for n in models if n != "nested"]  # DeLong: nested − each fixed model
    cmp = comparison(models, y, patients, args.bootstrap, pairs)
    machine = machine_info(cfg.device)
    report = {
        "dataset": {"path": str(args.dataset), "name": ds.name, "n": int(len(ds.y)), "identity": ds.identity},
        "outer_folds": [ch["outer_fold"] for ch in choices],
        "n_inner": args.n_inner,
        "inner_split_seed": args.seed,
        "device": str(cfg.device),
        "settings": _plain(settings(cands[0].run)),
        "candidates": {c.name: {"rundir": str(c.rundir), "recipe": c.recipe.as_dict()} for c in cands},
        "folds": [dict(ch, n_test=int((ds.fold == ch["outer_fold"]).sum())) for ch in choices],
        "times_chosen": {c.name: sum(ch["chosen"] == c.name for ch in choices) for c in cands},
        "reuse": (
            "The nested model's prediction for each outer test nodule is the chosen candidate's prediction "
            "in its own outer run: that run trained the candidate on the whole training part of the outer "
            "fold and tested it on the outer fold. Checked before reuse: every run was trained on this "
            "dataset's images, labels, masks and folds with the same settings and seed (only the recipe "
            "differs), and each outer fold result holds the fold's test rows and was trained on exactly "
            "the rows outside it, for the same number of epochs."
        ),
        "pooled": {"n_nodules": int(len(rows)), "n_patients": int(len(np.unique(patients)))},
        "comparisons": cmp,
        "bootstrap": args.bootstrap,
        "inner_trained": sum(ch["inner_trained"] for ch in choices),
        "inner_reused": sum(ch["inner_reused"] for ch in choices),
        "command": " ".join(sys.argv),
        "commit": started[1],
        "machine": f"{machine.get('cpu')}, {machine.get('cores')} cores"
        + (f", {machine['gpu']}" if machine.get("gpu") else ""),
        "elapsed_s": time.perf_counter() - started[0],
    }
    return report, markdown(report, markdown_table(cmp))


def write_report(out: str | None, report: dict, text: str) -> None:
    from nodulekit.outputs import atomic_paths

    if not out:
        print(text)
        return
    md = Path(out)
    with atomic_paths({"md": md, "json": md.with_suffix(".json")}) as tmp:
        tmp["md"].write_text(text)
        tmp["json"].write_text(json.dumps(report, indent=1, default=float) + "\n")
    print(text)
    print(f"report written to {md} and {md.with_suffix('.json')}", file=sys.stderr)


# ----------------------------------------------------------------------------- main


def run(args) -> tuple[dict | None, str]:
    from nodulekit.datasets import load_dataset
    from nodulekit.errors import NodulekitError
    from nodulekit.recipes import check_applicable

    started = (time.perf_counter(), _commit())  # the code that runs, not the code when it ends
    ds = load_dataset(args.dataset)
    cands = load_candidates(args.candidates, ds)
    cfgs = {c.name: train_config(c.run, c.rundir, args.device) for c in cands}
    cfg = cfgs[cands[0].name]
    outer_folds = sorted(set(args.outer_folds if args.outer_folds is not None else range(ds.n_folds)))
    if not set(outer_folds) <= set(range(ds.n_folds)):
        raise NodulekitError(f"--outer-folds {outer_folds}: {args.dataset} has folds 0..{ds.n_folds - 1}")
    if args.n_inner < 2:
        raise NodulekitError(f"--n-inner must be at least 2 (got {args.n_inner})")
    for c in cands:
        check_applicable(c.recipe, ds)
        check_reproduces(c, cfgs[c.name], ds)
    # every check on the outer runs before anything is trained or written
    outer = {c.name: {k: check_outer_fold(c, ds, k, cfgs[c.name]) for k in outer_folds} for c in cands}
    if args.time_one:
        (c,) = [c for c in cands if c.name == args.time_one] or [None]
        if c is None:
            raise NodulekitError(f"--time-one {args.time_one!r} is not one of the candidates")
        line = time_one(ds, c, cfgs[c.name], outer_folds[0], len(outer_folds), len(cands), args.n_inner, args.seed)
        return None, line
    if not args.workdir:
        raise NodulekitError("--workdir is needed (the inner runs are kept there)")
    workdir = Path(args.workdir)
    claim_workdir(workdir, workdir_record(ds, cands, cfg, args.n_inner, args.seed))
    choices = []
    for k in outer_folds:
        print(f"outer fold {k}: nested selection among {', '.join(c.name for c in cands)}", file=sys.stderr)
        choices.append(choose(ds, k, cands, cfg, workdir, args.n_inner, args.seed))
        ch = choices[-1]
        scores = ", ".join(f"{n} {v:.3f}" for n, v in ch["scores"].items())
        print(f"outer fold {k}: inner AUC {scores}; chosen {ch['chosen']}", file=sys.stderr)
    rows = np.flatnonzero(np.isin(ds.fold, outer_folds))
    models = {"nested": nested_predictions(ds, choices, outer)[rows]}
    models |= {c.name: finished_predictions(c.rundir, outer_folds)[1] for c in cands}
    models["features (LR)"] = cross_validated(feature_table(ds), ds.y, ds.fold)[rows]
    return build_report(args, ds, cands, cfg, choices, rows, models, started)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", help="the dataset artifact the candidate runs were trained on")
    p.add_argument("candidates", nargs="+", metavar="NAME=RUNDIR", help="each an outer run of one candidate recipe")
    p.add_argument("--workdir", help="inner runs (kept; a re-run reuses them)")
    p.add_argument("--n-inner", type=int, default=3, help="inner patient-grouped folds [3]")
    p.add_argument("--seed", type=int, default=0, help="seed of the inner fold split [0]")
    p.add_argument("--outer-folds", type=int, nargs="+", help="only these outer folds [all]")
    p.add_argument("--device", help="device of the inner runs [the one the outer runs recorded]")
    p.add_argument("--bootstrap", type=int, default=2000, help="patient-bootstrap resamples [2000]")
    p.add_argument("--time-one", metavar="NAME", help="only time one inner fold of candidate NAME (nothing kept)")
    p.add_argument("-o", "--output", help="write the report to this Markdown file and its .json beside it")
    return p


def main(argv=None) -> int:
    from nodulekit.errors import NodulekitError

    args = parser().parse_args(argv)
    try:
        report, text = run(args)
        if report is None:  # --time-one
            print(text)
        else:
            write_report(args.output, report, text)
    except NodulekitError as exc:
        print(f"nested_recipe: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
