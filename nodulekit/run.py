"""A RUNDIR, read and written in one place: :class:`Run`, ``run.json``, checkpoints, fold results.

Layout (docs/ARCHITECTURE.md, "RUNDIR")::

    RUNDIR/run.json               the settings every fold shares (written by ``train``)
    RUNDIR/fold<k>/checkpoint.pt  the fold's model, rewritten atomically after every epoch
    RUNDIR/fold<k>/result.h5      ``fold_result`` artifact, written once the fold is finished

Every stage that reads a run (evaluate, maps, wilcoxon, readers, export-onnx, the demo)
goes through :class:`Run`: one reader of ``run.json``, one of ``fold_result``, one way to
rebuild a fold's model from its checkpoint, one dataset check. A fold is *finished* when
its ``result.h5`` exists and covers every epoch run.json asks for, *unfinished* when it
has a checkpoint but no result (or a result of fewer epochs), *missing* otherwise.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nodulekit.constants import THRESHOLD, patient_of
from nodulekit.errors import ArtifactError, NodulekitError

RUN_FORMAT = 1
CHECKPOINT_FORMAT = 1
HISTORY_COLUMNS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc")
VAL_COLUMNS = ("epoch", "val_loss", "val_acc")
CHECKPOINT_FILE, RESULT_FILE = "checkpoint.pt", "result.h5"  # in RUNDIR/fold<k>/; paths from RunPaths
FOLD_STATUSES = ("finished", "unfinished", "missing")
# Where a fold stands for `nodulekit status`: unfinished splits into running (claimed by a
# live job) and interrupted (a checkpoint, no live job).
FOLD_STATES = ("finished", "running", "interrupted", "missing")
# run.json keys that define the experiment: every `train` writing into one RUNDIR must
# agree on them. Device, AMP, channels_last and compile are execution choices recorded per fold.
SIGNATURE_KEYS = (
    "arch",
    "model_options",
    "in_channels",
    "num_classes",
    "n_folds",
    "seed",
    "batch_size",
    "last_batch",
    "optimiser",
    "scheduler",
    "selection",
    "recipe",  # absent for the paper's recipe (nodulekit.recipes)
)
# What a run.json written before a signature key existed meant by it.
SIGNATURE_DEFAULTS = {"last_batch": "keep"}


# --------------------------------------------------------------------------- run.json


def read_run_json(rundir: str | os.PathLike) -> dict[str, Any]:
    """The run.json of a RUNDIR (the one reader), or a one-line error."""
    path = Path(rundir) / "run.json"
    if not Path(rundir).exists():
        raise NodulekitError(f"{rundir} is not a nodulekit run folder (it does not exist)")
    if not Path(rundir).is_dir():
        raise NodulekitError(
            f"{rundir} is a file, not a nodulekit run folder (give the RUNDIR that `nodulekit train -o` made)"
        )
    if not path.exists():
        raise NodulekitError(f"{rundir} is not a nodulekit run folder (no run.json)")
    try:
        record = json.loads(path.read_text())
    except ValueError as exc:
        raise NodulekitError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(record, dict):
        raise NodulekitError(f"{path} is not a run record (a JSON object)")
    dataset = record.get("dataset")
    if isinstance(dataset, str):  # older records name the dataset by its path alone
        record["dataset"] = {"path": dataset}
    elif dataset is not None and not isinstance(dataset, dict):
        raise NodulekitError(f"{path}: 'dataset' is {type(dataset).__name__}, expected an object or a path")
    return record


def write_run_json(rundir: str | os.PathLike, record: dict[str, Any]) -> None:
    """Write RUNDIR/run.json atomically (the one writer)."""
    from nodulekit.artifacts import atomic_path

    with atomic_path(Path(rundir) / "run.json", suffix=".json.part") as tmp:
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")


def recorded_dataset(record: dict[str, Any]) -> tuple[str | None, str | None]:
    """(path, fingerprint) of the training dataset a run record names (``dataset`` may be a
    dict or, in older records, the path itself)."""
    ds = record.get("dataset")
    path = ds.get("path") if isinstance(ds, dict) else ds
    fingerprint = record.get("dataset_fingerprint") or (ds.get("fingerprint") if isinstance(ds, dict) else None)
    return (str(path) if path else None), (str(fingerprint) if fingerprint else None)


def _describe_difference(old: dict, new: dict) -> str:
    diffs = []
    for key in SIGNATURE_KEYS:
        before, after = (r.get(key, SIGNATURE_DEFAULTS.get(key)) for r in (old, new))
        if before != after:
            diffs.append(f"{key} {json.dumps(before, default=str)} vs {json.dumps(after, default=str)}")
    return "; ".join(diffs)


def _check_same_experiment(rundir: Path, old: dict, record: dict) -> None:
    if old.get("in_channels") != record["in_channels"]:
        raise NodulekitError(
            f"{rundir} holds models for {old.get('in_channels')}-channel input but {record['dataset']['path']} has "
            f"{record['in_channels']} channels; use a new -o RUNDIR or --overwrite"
        )
    from nodulekit.datasets import identity_difference

    diff = identity_difference(old.get("dataset_identity"), record["dataset_identity"])
    if diff is not None:
        raise NodulekitError(
            f"{rundir} was not trained on {record['dataset']['path']}: {diff}; use a new -o RUNDIR or --overwrite"
        )
    diff = _describe_difference(old, record)
    if diff:
        raise NodulekitError(
            f"{rundir} was made with different settings ({diff}); use the same settings, a new -o RUNDIR, or --overwrite"
        )
    if record["epochs"] < old.get("epochs", 0):
        raise NodulekitError(
            f"{rundir} was configured for {old['epochs']} epochs; pass --epochs {old['epochs']} (or more to extend it)"
        )


def _fresh(rundir: Path) -> bool:
    """Nothing trained in RUNDIR yet: only ``fold<k>`` folders holding nothing but claims (a
    workflow engine makes the folders of its outputs before the job runs; another job may
    have claimed a fold) and hidden temporary files (another job writing run.json)."""
    from nodulekit.claims import CLAIM_FILE

    for entry in rundir.iterdir():
        fold = entry.is_dir() and entry.name.startswith("fold")
        if fold and all(p.name == CLAIM_FILE or p.name.startswith(".") for p in entry.iterdir()):
            continue
        if not entry.name.startswith("."):
            return False
    return True


def _fold_has_files(fold_dir: Path) -> bool:
    return any((fold_dir / name).exists() for name in (CHECKPOINT_FILE, RESULT_FILE))


def _discard_folds(rundir: Path, folds: Iterable[int] | None) -> None:
    """Delete the checkpoints and results of ``folds`` (all folds when None)."""
    fold_dirs = sorted(rundir.glob("fold*")) if folds is None else [RunPaths(rundir).fold_dir(k) for k in folds]
    for fold_dir in fold_dirs:
        for name in (CHECKPOINT_FILE, RESULT_FILE):
            (fold_dir / name).unlink(missing_ok=True)


def prepare_rundir(
    rundir: str | os.PathLike, record: dict, overwrite: bool = False, folds: Sequence[int] | None = None
) -> dict:
    """Create RUNDIR with run.json, or check that an existing one is the same experiment.

    Re-running the same command resumes. More epochs than recorded extends the run
    (the step schedule does not depend on the total); fewer, or any other change,
    is refused unless ``overwrite``. ``overwrite`` discards the files of ``folds`` only
    (all folds when None); other folds' results are never touched, so a changed setting
    with ``folds`` is refused while other folds hold results made with the old one.
    """
    from nodulekit.outputs import clean_stale_temps

    rundir = Path(rundir)
    run_json = rundir / "run.json"
    if rundir.exists() and not rundir.is_dir():
        raise NodulekitError(f"{rundir} exists and is not a folder")
    clean_stale_temps(run_json)
    if rundir.is_dir() and not run_json.exists() and not _fresh(rundir):
        raise NodulekitError(f"{rundir} is a non-empty folder without run.json; choose a new or empty -o RUNDIR")
    if run_json.exists() and overwrite:
        old = read_run_json(rundir)
        others = (
            []
            if folds is None
            else [
                d.name
                for d in sorted(rundir.glob("fold*"))
                if d.name[4:].isdigit() and int(d.name[4:]) not in set(folds) and _fold_has_files(d)
            ]
        )
        same = _describe_difference(old, record) == "" and old.get("dataset_fingerprint") == record.get(
            "dataset_fingerprint"
        )
        if others and not same:
            raise NodulekitError(
                f"{rundir} holds {', '.join(others)} made with other settings; --overwrite with --fold replaces "
                "only the folds asked for and the run would mix settings: drop --fold to replace the whole run, "
                "or use a new -o RUNDIR"
            )
        _discard_folds(rundir, folds if others else None)
        if not others:
            run_json.unlink()
    if run_json.exists():
        old = read_run_json(rundir)
        _check_same_experiment(rundir, old, record)
        if record["epochs"] > old.get("epochs", 0):
            old["epochs"] = record["epochs"]
            write_run_json(rundir, old)
        return old
    rundir.mkdir(parents=True, exist_ok=True)
    write_run_json(rundir, record)
    return record


# --------------------------------------------------------------------------- checkpoints


def build_model(arch: str, in_channels: int, num_classes: int, options: dict):
    """A registry model, with bad options as a one-line error."""
    from nodulekit.models import create_model

    try:
        return create_model(arch, in_channels, num_classes=num_classes, **options)
    except NodulekitError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise NodulekitError(f"cannot build model {arch!r} with options {options}: {exc}") from None


def save_checkpoint(path: Path, ckpt: dict) -> None:
    """Write a checkpoint atomically (an interrupted save keeps the previous one).

    It is serialised in memory and written with plain file I/O, so a full disk is a
    one-line error naming the checkpoint (torch's own writer reports it as an internal error).
    """
    import io

    import torch

    from nodulekit.outputs import write_bytes

    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    write_bytes(path, buffer.getbuffer())


def _checkpoint_problem(path: Path, exc: Exception) -> str:
    """Why torch could not load ``path``, in our words (torch's text talks about its own options)."""
    import pickle
    import zipfile

    if path.stat().st_size == 0:
        return "the file is empty"
    if not zipfile.is_zipfile(path):
        return "not a PyTorch zip archive (truncated, or another kind of file)"
    if isinstance(exc, pickle.UnpicklingError) and "weights only" in str(exc).lower():
        return (
            "it holds Python objects besides tensors and plain data, which are not loaded because loading them "
            "could run arbitrary code (nodulekit checkpoints hold none)"
        )
    return f"its contents are unreadable ({type(exc).__name__}; truncated or corrupt)"


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint dict (``weights_only``), or a one-line error for a missing, corrupt or foreign file."""
    import torch

    path = Path(path)
    if not path.exists():
        raise NodulekitError(f"{path} does not exist")
    if path.is_dir():
        raise NodulekitError(f"{path} is a folder, not a checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file: one line for the user
        raise NodulekitError(
            f"{path} is not a readable nodulekit checkpoint: {_checkpoint_problem(path, exc)}"
        ) from None
    missing = [k for k in ("state_dict", "arch", "in_channels") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise NodulekitError(f"{path} is not a nodulekit checkpoint (missing {', '.join(missing)})")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike):
    """The model a checkpoint describes, with its weights, in eval mode (on CPU).

    Weights that do not fit the recorded architecture are a one-line error.
    """
    model = build_model(
        ckpt["arch"], int(ckpt["in_channels"]), int(ckpt.get("num_classes", 2)), dict(ckpt.get("config") or {})
    )
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise NodulekitError(f"{path}: weights do not fit a {ckpt['arch']} model ({first})") from None
    return model.eval()


# --------------------------------------------------------------------------- fold_result


@dataclass
class FoldResult:
    """One finished fold: its learning curves and test-set predictions (``fold_result`` artifact)."""

    fold: int
    history: np.ndarray  # [epochs, len(columns)]
    columns: list[str]
    test_index: np.ndarray  # dataset rows of the test fold
    test_prob: np.ndarray  # malignant probability of each test row
    test_y: np.ndarray
    test_nodule_id: list[str]
    test_patient_id: list[str]
    selected_epoch: int
    epochs: int | None  # epochs the fold was trained for (None: not recorded)
    val_history: np.ndarray | None = None
    epoch_seconds: np.ndarray | None = None
    train_index: np.ndarray | None = None
    val_index: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)


def check_predictions(path: str | os.PathLike, prob: np.ndarray) -> None:
    """Refuse probabilities that are not numbers in [0, 1] (a NaN is no prediction)."""
    bad = ~(np.isfinite(prob) & (prob >= 0) & (prob <= 1))
    if bad.any():
        raise ArtifactError(
            f"{path}: test_prob holds {int(bad.sum())} value(s) that are not probabilities "
            f"(first {float(prob[bad][0])!r}); the fold's result is unusable, retrain it"
        )


def read_fold_result(path: str | os.PathLike, fold: int | None = None) -> FoldResult:
    """Read one ``fold_result`` artifact (the one reader)."""
    from nodulekit.artifacts import open_artifact, read_strings

    with open_artifact(path, "fold_result") as f:
        nodule_id = read_strings(f["test_nodule_id"])
        patient_id = read_strings(f["test_patient_id"]) if "test_patient_id" in f else None
        columns = list(f["history"].attrs.get("columns", HISTORY_COLUMNS))
        optional = {
            name: np.asarray(f[name][()], dtype)
            for name, dtype in (
                ("val_history", np.float64),
                ("epoch_seconds", np.float64),
                ("train_index", np.int64),
                ("val_index", np.int64),
            )
            if name in f
        }
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
        result = FoldResult(
            fold=int(attrs.get("fold", -1 if fold is None else fold)),
            history=np.asarray(f["history"][()], np.float64),
            columns=[c.decode() if isinstance(c, bytes) else str(c) for c in columns],
            test_index=np.asarray(f["test_index"][()], np.int64),
            test_prob=np.asarray(f["test_prob"][()], np.float64),
            test_y=np.asarray(f["test_y"][()], np.int64),
            test_nodule_id=nodule_id,
            test_patient_id=patient_id if patient_id is not None else [patient_of(n) for n in nodule_id],
            selected_epoch=int(attrs.get("selected_epoch", -1)),
            epochs=int(attrs["epochs"]) if "epochs" in attrs else None,
            attrs=attrs,
            **optional,
        )
    if fold is not None:
        result.fold = int(fold)
    n = len(result.test_index)
    if not (len(result.test_prob) == len(result.test_y) == len(result.test_nodule_id) == n):
        raise ArtifactError(f"{path}: test_index, test_prob, test_y and test_nodule_id differ in length")
    check_predictions(path, result.test_prob)
    return result


def write_fold_result(
    path: str | os.PathLike,
    *,
    prov: dict[str, Any],
    history,
    test_index,
    test_prob,
    test_y,
    test_nodule_id: Sequence[str],
    test_patient_id: Sequence[str] | None = None,
    train_index=None,
    val_index=None,
    val_history=None,
    epoch_seconds=None,
    attrs: dict[str, Any] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write ``fold<k>/result.h5`` (``fold_result`` kind) atomically (the one writer).

    ``attrs``: plain attributes (fold, arch, epochs, selected_epoch, ...); dict or list
    values are stored as JSON. The decision threshold is always recorded.
    """
    from nodulekit.artifacts import set_json_attr, write_artifact, write_strings

    with write_artifact(path, "fold_result", prov, overwrite=overwrite) as f:
        h = f.create_dataset("history", data=np.asarray(history, np.float64).reshape(-1, len(HISTORY_COLUMNS)))
        h.attrs["columns"] = list(HISTORY_COLUMNS)
        if epoch_seconds is not None:
            f["epoch_seconds"] = np.asarray(epoch_seconds, np.float64)
        f["test_index"] = np.asarray(test_index, np.int64)
        f["test_prob"] = np.asarray(test_prob, np.float64)
        f["test_y"] = np.asarray(test_y, np.int64)
        write_strings(f, "test_nodule_id", test_nodule_id)
        if test_patient_id is not None:
            write_strings(f, "test_patient_id", test_patient_id)
        if train_index is not None:
            f["train_index"] = np.asarray(train_index, np.int64)
        if val_index is not None:
            f["val_index"] = np.asarray(val_index, np.int64)
            v = f.create_dataset("val_history", data=np.asarray(val_history, np.float64).reshape(-1, len(VAL_COLUMNS)))
            v.attrs["columns"] = list(VAL_COLUMNS)
        for name, value in {"threshold": THRESHOLD, **(attrs or {})}.items():
            if isinstance(value, (dict, list)):
                set_json_attr(f, name, value)
            else:
                f.attrs[name] = value
    return Path(path)


# --------------------------------------------------------------------------- the Run


@dataclass
class FoldProgress:
    """One fold's state for ``nodulekit status`` (see :meth:`Run.fold_progress`)."""

    fold: int
    state: str  # one of FOLD_STATES
    epochs_done: int  # from the checkpoint
    epochs: int  # what run.json asks for
    claim: dict[str, Any] | None = None
    note: str = ""


def _epochs_done(checkpoint: Path) -> int:
    """Epochs a checkpoint has done (0 when absent or unreadable); memory-mapped, so only that field is read."""
    import torch

    if not checkpoint.exists():
        return 0
    try:
        return int(torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True).get("epoch", 0))
    except Exception:  # a damaged checkpoint: training refuses it with its own message
        return 0


class RunPaths:
    """Where a RUNDIR's files are (the one place that spells them); reads nothing, so training
    can use it before run.json exists."""

    def __init__(self, rundir: str | os.PathLike):
        self.path = Path(rundir)

    def fold_dir(self, k: int) -> Path:
        return self.path / f"fold{int(k)}"

    def checkpoint_path(self, k: int) -> Path:
        return self.fold_dir(k) / CHECKPOINT_FILE

    def result_path(self, k: int) -> Path:
        return self.fold_dir(k) / RESULT_FILE


class Run(RunPaths):
    """A RUNDIR: its paths, run.json, training dataset, folds and their models.

    ``Run(rundir)`` reads and checks run.json at once (a one-line error if it is not a
    run folder); everything else is read when asked for.
    """

    def __init__(self, rundir: str | os.PathLike):
        super().__init__(rundir)
        self.record: dict[str, Any] = read_run_json(self.path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    # -- what run.json says -------------------------------------------------------------
    @property
    def n_folds(self) -> int:
        n = self.record.get("n_folds")
        if not isinstance(n, int) or n < 1:
            raise NodulekitError(f"{self.path}/run.json records no n_folds")
        return n

    @property
    def arch(self) -> str:
        return str(self.record.get("arch", "?"))

    @property
    def epochs(self) -> int:
        return int(self.record.get("epochs", 0))

    # -- the dataset it was trained on ---------------------------------------------------
    @property
    def dataset_fingerprint(self) -> str | None:
        return recorded_dataset(self.record)[1]

    @property
    def dataset_identity(self) -> dict[str, Any] | None:
        """The identity (:func:`nodulekit.datasets.dataset_identity`) of the training dataset."""
        identity = self.record.get("dataset_identity")
        return identity if isinstance(identity, dict) else None

    def dataset_path(self, override: str | os.PathLike | None = None) -> Path:
        """The dataset given, else the one recorded in run.json."""
        if override is not None:
            return Path(override)
        path = recorded_dataset(self.record)[0]
        if not path:
            raise NodulekitError(f"{self.path}/run.json records no dataset path; pass --dataset")
        return Path(path)

    def check_dataset(self, ds, path: str | os.PathLike | None = None) -> None:
        """Refuse, in one line saying what differs, a loaded dataset that is not the one this
        run was trained on (images, labels, masks, or the fold assignment). A run.json from
        before dataset identities records none and is refused: re-train it."""
        from nodulekit.datasets import check_identity

        check_identity(self.dataset_identity, ds, str(self.path), path)

    def load_dataset(self, override: str | os.PathLike | None = None):
        """The training dataset (or ``override``), read and checked against run.json."""
        from nodulekit.datasets import load_dataset

        path = self.dataset_path(override)
        ds = load_dataset(path)
        self.check_dataset(ds, path)
        return ds

    # -- folds ----------------------------------------------------------------------------
    def fold_status(self, k: int) -> str:
        """``finished``, ``unfinished`` or ``missing`` (see the module docstring)."""
        return self._status(k)[0]

    def _status(self, k: int) -> tuple[str, str]:
        """(status, why) of fold ``k``; reads only the result's attributes."""
        from nodulekit.artifacts import open_artifact

        result = self.result_path(k)
        if result.exists():
            with open_artifact(result, "fold_result") as f:
                done = int(f.attrs.get("epochs", self.epochs))
            if done < self.epochs:
                return "unfinished", f"{k} ({done} of {self.epochs} epochs)"
            return "finished", ""
        if self.checkpoint_path(k).exists():
            return "unfinished", f"{k} (in training, no result yet)"
        return "missing", str(k)

    def fold_progress(self, k: int) -> FoldProgress:
        """Where fold ``k`` stands (``FOLD_STATES``), with epochs done and the claim of the job training it."""
        from nodulekit.claims import read_claim

        status, _ = self._status(k)
        claim = read_claim(self.fold_dir(k))
        alive = claim.alive() if claim is not None else False
        progress = FoldProgress(k, "missing", _epochs_done(self.checkpoint_path(k)), self.epochs)
        if status == "finished":
            progress.state = "finished"
        elif alive is not False:  # a live job here, or a job on another host (cannot be checked)
            progress.state, progress.claim = "running", asdict(claim)
            progress.note = claim.describe() + ("" if alive else " (other host: not checked)")
        elif status == "unfinished":
            progress.state = "interrupted"
            progress.note = f"stale claim: {claim.describe()} is not running" if claim is not None else ""
        return progress

    def require_finished(self, folds: Iterable[int], purpose: str = "") -> None:
        """Raise one line naming every fold of ``folds`` that is not finished."""
        states = {k: self._status(k) for k in sorted(set(folds))}
        missing = [why for status, why in states.values() if status == "missing"]
        unfinished = [why for status, why in states.values() if status == "unfinished"]
        if not missing and not unfinished:
            return
        lacking = [f"fold{k}" for k, (status, _) in states.items() if status != "finished"]
        problems = [f"fold(s) {', '.join(missing)} missing"] if missing else []
        problems += [f"fold(s) {', '.join(unfinished)} unfinished"] if unfinished else []
        dataset = recorded_dataset(self.record)[0] or "DATASET"
        raise NodulekitError(
            f"{self.path} lacks finished fold(s) {', '.join(lacking)} ({'; '.join(problems)} of {self.n_folds})"
            f"{purpose}; finish them with `nodulekit train {dataset} ... -o {self.path}` (same settings)"
        )

    def finished_folds(self) -> list[int]:
        return [k for k in range(self.n_folds) if self.fold_status(k) == "finished"]

    def fold_result(self, k: int) -> FoldResult:
        """Fold ``k``'s ``fold_result`` (test predictions, curves); the fold must be finished."""
        self.require_finished([k])
        return read_fold_result(self.result_path(k), k)

    def fold_results(self) -> list[FoldResult]:
        """Every fold's result; refuses a run with a missing or unfinished fold, or overlapping tests."""
        self.require_finished(range(self.n_folds))
        folds = [self._checked(read_fold_result(self.result_path(k), k)) for k in range(self.n_folds)]
        indices = np.concatenate([f.test_index for f in folds])
        if len(np.unique(indices)) != len(indices):
            raise NodulekitError(f"{self.path}: the test folds overlap (a nodule is tested twice); the run is corrupt")
        return folds

    def test_rows(self, nodule_id: Sequence[str]) -> dict[int, np.ndarray]:
        """Dataset rows each finished fold tested on, checked against the dataset's ``nodule_id``."""
        rows: dict[int, np.ndarray] = {}
        for k in self.finished_folds():
            result = self._checked(read_fold_result(self.result_path(k), k))
            index = result.test_index
            if index.size and (index.min() < 0 or index.max() >= len(nodule_id)):
                raise NodulekitError(
                    f"{self.result_path(k)} indexes rows beyond the dataset's {len(nodule_id)}; wrong --dataset?"
                )
            if [nodule_id[i] for i in index] != result.test_nodule_id:
                raise NodulekitError(
                    f"{self.result_path(k)} tested other nodules than the dataset has at those rows; wrong --dataset?"
                )
            rows[k] = index
        return rows

    def _checked(self, result: FoldResult) -> FoldResult:
        """A fold result whose recorded dataset is this run's (a fold trained on another
        dataset, or before identities were recorded, is refused in one line)."""
        from nodulekit.datasets import identity_difference

        path = self.result_path(result.fold)
        if self.dataset_identity is None:
            raise NodulekitError(
                f"{self.path}: run.json records no dataset identity (trained before fold assignments were part of "
                "it), so its folds cannot be checked; re-train it with this version"
            )
        recorded = result.attrs.get("dataset_identity")
        try:
            recorded = json.loads(recorded) if isinstance(recorded, (str, bytes)) else None
        except ValueError:
            recorded = None
        if recorded is None or recorded.get("fingerprint") != self.dataset_identity["fingerprint"]:
            diff = identity_difference(recorded, self.dataset_identity) if recorded else "it records none"
            raise NodulekitError(f"{path} was not trained on this run's dataset ({diff}); re-train fold {result.fold}")
        return result

    def load_model(self, k: int, device: str = "cpu"):
        """Fold ``k``'s trained model in eval mode on ``device``, and its checkpoint dict."""
        from nodulekit.devices import resolve_device

        path = self.checkpoint_path(k)
        if not path.exists():
            raise NodulekitError(f"{path} does not exist: fold {k} of {self.path} has not been trained")
        ckpt = load_checkpoint(path)
        self.check_checkpoint(ckpt, path)
        return model_from_checkpoint(ckpt, path).to(resolve_device(device)), ckpt

    def check_checkpoint(self, ckpt: dict[str, Any], path: Path) -> None:
        """Refuse a checkpoint that is not this run's (e.g. another run's fold copied in): its
        architecture, input channels, model options and training dataset must be run.json's."""
        rec = self.record
        config = ckpt.get("config") or {}  # the model's whole config: run.json's options plus defaults
        checks = [
            ("architecture", ckpt.get("arch"), rec.get("arch")),
            ("input channels", ckpt.get("in_channels"), rec.get("in_channels")),
            ("training dataset", ckpt.get("dataset_fingerprint"), self.dataset_fingerprint),
        ]
        checks += [(f"model option {k}", config.get(k), v) for k, v in (rec.get("model_options") or {}).items()]
        for what, found, recorded in checks:
            if found is not None and recorded is not None and found != recorded:
                raise NodulekitError(
                    f"{path} is not a checkpoint of {self.path}: its {what} is {found!r}, run.json says {recorded!r}"
                )


def load_run(rundir: str | os.PathLike) -> dict[str, Any]:
    """The run.json record of a RUNDIR (shorthand for ``Run(rundir).record``)."""
    return Run(rundir).record


def load_fold_model(rundir: str | os.PathLike, fold: int, device: str = "cpu"):
    """The trained model of one fold, in eval mode, and its checkpoint dict."""
    return Run(rundir).load_model(fold, device)
