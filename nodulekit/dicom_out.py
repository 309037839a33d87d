"""``predict --dicom``: the results as DICOM objects that go back beside the source series (highdicom).

For a scan read from a DICOM series, in the ``-o`` folder:

- ``<id>_map.dcm``: a **Parametric Map** (float32) of the nodule's malignant-class map, the same
  values as ``<id>_map.nii.gz`` (``predict_output.map_volume``) on the source images' own
  frames: one frame per source slice the map covers, each frame on that image's grid, with its
  ImagePositionPatient and ImageOrientationPatient, the series' FrameOfReferenceUID, and the
  source images referenced (ReferencedSeriesSequence, per-frame DerivationImageSequence).
- ``findings_sr.dcm``: a **Comprehensive 3D SR** measurement report (TID 1500): per nodule a
  volumetric ROI group (TID 1411) with its tracking id, its centre as a 3D point in the
  series' frame of reference, its diameter (mm) and the predicted probability of malignancy
  (DCM 111047 "Probability of cancer"), the algorithm (nodulekit model, version) and the
  source images it was measured on.

Both share the source study (same StudyInstanceUID and patient) and get new series UIDs.
Research use: they say "not for clinical use" in their series descriptions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from nodulekit.errors import NodulekitError

MAP_FILE = "{name}_map.dcm"
SR_FILE = "findings_sr.dcm"
MANUFACTURER = "nodulekit"
SERIES_NUMBER_MAP, SERIES_NUMBER_SR = 9901, 9902
NOT_CLINICAL = "research use only, not for clinical use"


def check_dicom_request(dicom: bool, scan_path, output) -> None:
    """``--dicom`` needs a DICOM series to refer to and a folder to write into (checked before any work)."""
    if not dicom:
        return
    if output is None:
        raise NodulekitError("--dicom writes into the -o folder: give -o DIR")
    if not Path(scan_path).is_dir():
        raise NodulekitError(
            f"--dicom needs a DICOM series to refer to, and {scan_path} is not a DICOM folder (a NIfTI file has "
            "no DICOM identity: study, series, frame of reference)"
        )


def source_datasets(scan) -> list:
    """The source images in the order of the scan's stored slices (``scan.volume.files``)."""
    import pydicom

    if scan.kind != "dicom" or not scan.volume.files:
        raise NodulekitError(f"--dicom needs a DICOM series; {scan.path} was read as {scan.kind}")
    return [pydicom.dcmread(p) for p in scan.volume.files]


def _frames(scan, volume_map: np.ndarray) -> np.ndarray:
    """A map on the volume grid as source frames [slice, row, column] (the files' own pixel layout)."""
    stored = scan.to_src_array(volume_map)  # (column, row, slice in file order), as the scan was read
    return np.ascontiguousarray(stored.transpose(2, 1, 0), dtype=np.float32)


def _software() -> str:
    from nodulekit import __version__

    return f"nodulekit {__version__}"


def parametric_map(sources: list, frames: np.ndarray, rec: dict, card: dict[str, Any]):
    """The Parametric Map of one nodule: the frames the map covers, on their source images."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    used = np.flatnonzero(frames.reshape(len(frames), -1).any(axis=1))
    if used.size == 0:  # a map that is 0 everywhere still gets its centre frame
        used = np.array([len(frames) // 2])
    top = float(frames.max())
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="map",
        lut_explanation=f"{card.get('map_kind', 'activation')} map, malignant class (model units)",
        unit=codes.UCUM.NoUnits,
        value_range=(0.0, top if top > 0 else 1.0),
        slope=1.0,
        intercept=0.0,
    )
    return hd.pm.ParametricMap(
        source_images=[sources[i] for i in used],
        pixel_array=frames[used],
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER_MAP,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=str(card.get("arch", "nodulekit model")),
        software_versions=_software(),
        device_serial_number="none",
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[  # the display window: 0 .. the map's maximum
            hd.VOILUTTransformation(window_center=top / 2 if top > 0 else 0.5, window_width=top if top > 0 else 1.0)
        ],
        series_description=f"nodulekit map, nodule {rec['id']} ({NOT_CLINICAL})"[:64],
    )


def _nodule_group(hd, codes, rec: dict, sources: list, frame_of_reference: str, algorithm):
    """TID 1411 group of one nodule: its centre (3D point), diameter and probability."""
    lps = np.asarray(rec["centre_mm"], float) * ([-1, -1, 1] if rec["frame"] == "RAS" else 1)
    surface = hd.sr.VolumeSurface(
        graphic_type=hd.sr.GraphicTypeValues3D.POINT,
        graphic_data=lps[None, :],
        frame_of_reference_uid=frame_of_reference,
        source_images=[hd.sr.SourceImageForSegmentation.from_source_image(ds) for ds in sources],
    )
    diameter = hd.sr.Measurement(
        name=codes.SCT.Diameter,
        value=float(rec["diameter_mm"]),
        unit=codes.UCUM.Millimeter,
        algorithm_id=algorithm,
    )
    probability = hd.sr.Measurement(
        name=codes.DCM.ProbabilityOfCancer,
        value=float(rec["probability"]),
        unit=codes.UCUM.NoUnits,
        algorithm_id=algorithm,
    )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"nodule {rec['id']}"),
        referenced_volume_surface=surface,
        finding_type=codes.SCT.Nodule,
        algorithm_id=algorithm,
        measurements=[diameter, probability],
    )


def findings_report(sources: list, records: list[dict], card: dict[str, Any]):
    """The Comprehensive 3D SR (TID 1500) of every nodule's findings."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from nodulekit import __version__

    frame_of_reference = str(sources[0].FrameOfReferenceUID)
    algorithm = hd.sr.AlgorithmIdentification(
        name=f"nodulekit {card.get('arch', 'model')} ({card.get('map_kind', '')})".strip(),
        version=__version__,
        parameters=[f"threshold {card['decision']['threshold']:g}"] if card.get("decision") else None,
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name="nodulekit", manufacturer_name=MANUFACTURER, model_name=str(card.get("arch", ""))
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=[_nodule_group(hd, codes, r, sources, frame_of_reference, algorithm) for r in records],
        title=codes.DCM.ImagingMeasurementReport,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=sources,
        content=report,
        series_number=SERIES_NUMBER_SR,
        series_instance_uid=hd.UID(),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        series_description=f"nodulekit findings ({NOT_CLINICAL})"[:64],
    )


def write_dicom_outputs(folder: Path, scan, names: list[str], volume_maps: list[np.ndarray], records, card) -> None:
    """Write the Parametric Maps and the SR into ``folder`` (the -o folder while it is still temporary)."""
    sources = source_datasets(scan)
    for name, vol, rec in zip(names, volume_maps, records, strict=True):
        parametric_map(sources, _frames(scan, vol), rec, card).save_as(folder / MAP_FILE.format(name=name))
    findings_report(sources, records, card).save_as(folder / SR_FILE)
