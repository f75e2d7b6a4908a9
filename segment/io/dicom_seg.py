"""A predicted label map as a DICOM Segmentation object (DICOM-SEG) that references the series it was predicted on.

PACS and viewers (OHIF, 3D Slicer, Horos) show a DICOM-SEG over its source series: it carries the source's patient,
study and frame of reference, a list of every source slice (study, series and SOP instance UIDs), and one BINARY segment
per foreground class of the model, named after it and coded (SNOMED CT codes from pydicom's `codes` for common
anatomy, Tissue otherwise), with the algorithm that made it ("segment", AI family, our version).

Frames must land on the right slices: `segment.io.dicom.read_dicom_series` gives an (x, y, z) array with x = columns,
y = rows and z = the slices sorted along the slice normal, so here the same checked reader sorts the source headers
(the very same functions, hence the same order), the label map becomes (slices, rows, columns) and slice k is paired
with header k. Before anything is written, the world grid of the sorted headers is checked against the label map's
affine, so a frame can never be paired with the wrong slice silently.

Writing follows the NIfTI rules (`segment.io.nifti.check_target`): never onto an input, never into the series folder
(it would become a second series there), never over a file segment did not write (our SEG objects say Manufacturer
and ManufacturerModelName "segment"), an existing one of ours only with --overwrite; written to a temporary file,
read back and checked, then renamed over the target.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from segment.errors import GeometryError, InputError
from segment.io.files import check_output, replaced_atomically
from segment.io.geometry import Geometry
from segment.version import segment_version

SEG_SUFFIX = ".dcm"
MANUFACTURER = "segment"  # Manufacturer and ManufacturerModelName of every SEG we write: how we recognise our own
SERIES_DESCRIPTION = "segment"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage (BINARY and FRACTIONAL)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

# Class name words -> (segmented property category, segmented property type), attribute names of pydicom's
# `codes.cid7150` (category) and `codes.SCT` (type). First match wins: abnormal findings before the organ they are
# in ("liver tumour" is a tumour), longer phrases before their words ("portal vein" before "vein").
_CODE_TABLE: list[tuple[tuple[str, ...], str, str]] = [
    (("tumor", "tumour", "tumors", "tumours", "cancer", "carcinoma", "neoplasm", "metastasis", "metastases"),
     "MorphologicallyAbnormalStructure", "Neoplasm"),
    (("lesion", "lesions"), "MorphologicallyAbnormalStructure", "Lesion"),
    (("cyst", "cysts"), "MorphologicallyAbnormalStructure", "Cyst"),
    (("edema", "oedema"), "MorphologicallyAbnormalStructure", "Edema"),
    (("necrosis",), "MorphologicallyAbnormalStructure", "Necrosis"),
    (("portal vein",), "AnatomicalStructure", "PortalVein"),
    (("inferior vena cava", "vena cava", "ivc"), "AnatomicalStructure", "InferiorVenaCava"),
    (("spinal cord",), "AnatomicalStructure", "SpinalCord"),
    (("brain stem", "brainstem"), "AnatomicalStructure", "BrainStem"),
    (("adrenal gland", "adrenal"), "AnatomicalStructure", "AdrenalGland"),
    (("liver",), "AnatomicalStructure", "Liver"),
    (("spleen",), "AnatomicalStructure", "Spleen"),
    (("kidney", "kidneys"), "AnatomicalStructure", "Kidney"),
    (("hippocampus",), "AnatomicalStructure", "Hippocampus"),
    (("lung", "lungs"), "AnatomicalStructure", "Lung"),
    (("heart",), "AnatomicalStructure", "Heart"),
    (("aorta",), "AnatomicalStructure", "Aorta"),
    (("pancreas",), "AnatomicalStructure", "Pancreas"),
    (("brain",), "AnatomicalStructure", "Brain"),
    (("prostate",), "AnatomicalStructure", "Prostate"),
    (("bladder",), "AnatomicalStructure", "Bladder"),
    (("stomach",), "AnatomicalStructure", "Stomach"),
    (("gallbladder",), "AnatomicalStructure", "Gallbladder"),
    (("esophagus", "oesophagus"), "AnatomicalStructure", "Esophagus"),
    (("colon",), "AnatomicalStructure", "Colon"),
    (("trachea",), "AnatomicalStructure", "Trachea"),
    (("vertebra", "vertebrae"), "AnatomicalStructure", "Vertebra"),
    (("rib", "ribs"), "AnatomicalStructure", "Rib"),
    (("femur",), "AnatomicalStructure", "Femur"),
    (("skull",), "AnatomicalStructure", "Skull"),
    (("muscle", "muscles"), "AnatomicalStructure", "Muscle"),
    (("bone", "bones"), "AnatomicalStructure", "Bone"),
    (("artery", "arteries"), "AnatomicalStructure", "Artery"),
    (("vein", "veins"), "AnatomicalStructure", "Vein"),
]
_GENERIC = ("Tissue", "Tissue")  # a class we cannot name: category Tissue, type Tissue (as 3D Slicer does)


def is_seg_path(path: Path) -> bool:
    return Path(path).name.lower().endswith(SEG_SUFFIX)


def property_codes(name: str) -> tuple[Any, Any]:
    """(segmented property category, segmented property type) coded concepts for a class name."""
    from pydicom.sr.codedict import codes

    words = " ".join(re.findall(r"[a-z]+", re.sub(r"([a-z])([A-Z])", r"\1 \2", name).lower()))
    padded = f" {words} "
    for phrases, category, kind in _CODE_TABLE:
        if any(f" {phrase} " in padded for phrase in phrases):
            return getattr(codes.cid7150, category), getattr(codes.SCT, kind)
    return getattr(codes.cid7150, _GENERIC[0]), getattr(codes.SCT, _GENERIC[1])


def software_version() -> str:
    return segment_version()


def is_our_seg(path: Path) -> bool:
    """True when `path` is a DICOM Segmentation that segment wrote (Manufacturer and model name "segment")."""
    import pydicom

    if not Path(path).is_file():
        return False
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # not DICOM, truncated: certainly not ours  # noqa: BLE001
        return False
    return (str(ds.get("Modality", "")) == "SEG" and str(ds.get("Manufacturer", "")) == MANUFACTURER
            and str(ds.get("ManufacturerModelName", "")) == MANUFACTURER)


def check_seg_target(path: Path, overwrite: bool, inputs: tuple[Path, ...] = ()) -> Path:
    """Refuse a DICOM-SEG output before any compute, by the same rules as `segment.io.nifti.check_target`."""
    path = Path(path)
    if not is_seg_path(path):
        raise InputError(f"{path}: DICOM-SEG outputs are written as .dcm files; use a .dcm file name")
    resolved = path.resolve()
    for p in inputs:
        source = Path(p).resolve()
        if source.is_dir() and resolved.parent == source:
            raise InputError(f"{path}: inside the DICOM series folder {p}, where it would be read as a second series "
                             "next time; write it beside the folder or choose another -o")
    return check_output(path, overwrite, inputs, is_our_seg)


def sorted_source_headers(folder: Path, series: str | None = None) -> list[Any]:
    """The series' headers in the order of `read_dicom_series`' z axis (sorted along the slice normal).

    Uses the checked reader's own selection and sorting, so the order is the one the label map was predicted in.
    """
    from segment.io.dicom import _check_uniform, _scan, _select, _slice_grid

    folder = Path(folder)
    info, headers = _select(folder, _scan(folder), series)
    where = f"{folder}: series {info.uid}"
    iop = _check_uniform(where, info.files, headers)
    files, _ = _slice_grid(where, info.files, headers, iop)
    by_file = dict(zip(info.files, headers, strict=True))
    return [by_file[f] for f in files]


def headers_affine(headers: list[Any]) -> np.ndarray:
    """RAS+ affine of (column, row, slice) indices from sorted single-frame headers (as `read_dicom_series` gives)."""
    iop = np.array([float(v) for v in headers[0].ImageOrientationPatient])
    row_spacing, column_spacing = (float(v) for v in headers[0].PixelSpacing)
    first = np.array([float(v) for v in headers[0].ImagePositionPatient])
    last = np.array([float(v) for v in headers[-1].ImagePositionPatient])
    step = (last - first) / max(len(headers) - 1, 1)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = iop[:3] * column_spacing, iop[3:] * row_spacing, step, first
    ras = np.eye(4)
    ras[:3, :] = LPS_TO_RAS @ lps[:3, :]
    return ras


# Type 2 attributes highdicom copies from the source by attribute access: a missing one is written empty, as allowed
_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
          "StudyTime", "ReferringPhysicianName")


def _prepared(headers: list[Any], where: str) -> list[Any]:
    """Copies of the headers with what highdicom needs: refused in one line when a Type 1 attribute is missing."""
    import copy

    out = []
    for ds in headers:
        missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
                               "FrameOfReferenceUID") if not str(ds.get(k, "") or "").strip()]
        if missing:
            raise InputError(f"{where}: DICOM-SEG needs {', '.join(missing)} in every source slice, and "
                             f"{getattr(ds, 'filename', 'a slice')} has none; the label map can still be written as "
                             "NIfTI (--format nifti)")
        ds = copy.deepcopy(ds)  # headers only (read without pixels): small
        for keyword in _TYPE2:
            if keyword not in ds:
                setattr(ds, keyword, "")
        if str(ds.PatientSex or "") not in ("", "M", "F", "O"):
            ds.PatientSex = ""
        if "Modality" not in ds:
            ds.Modality = "OT"
        out.append(ds)
    return out


def seg_source(folder: Path, series: str | None = None) -> list[Any]:
    """The source headers a DICOM-SEG of this series will reference, sorted as `read_dicom_series`' z axis, and
    checked for what a SEG needs (one line otherwise): call it before any compute, pass it to `write_dicom_seg`."""
    headers = sorted_source_headers(Path(folder), series)
    return _prepared(headers, f"{folder}: series {headers[0].SeriesInstanceUID}")


def write_dicom_seg(labels: np.ndarray, geometry: Geometry, path: str | Path, *, source: Path, names: dict[int, str],
                    series: str | None = None, overwrite: bool = False, inputs: tuple[Path, ...] = (),
                    headers: list[Any] | None = None) -> Path:
    """Write class indices `labels` (x, y, z) on the grid of DICOM series `source` as a BINARY DICOM-SEG.

    `names` maps segment numbers, i.e. class indices 1..K-1, to class names; every class becomes a segment, also one
    that is empty in this scan (so segment numbers mean the same class in every case), and a scan without any
    foreground gives a valid SEG whose segments are all empty. `headers`: from `seg_source` (read again if None).
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    path = check_seg_target(Path(path), overwrite, inputs)
    source = Path(source)
    labels = np.asarray(labels)
    if labels.shape != geometry.shape:
        raise GeometryError(f"{path}: labels of shape {labels.shape} do not match the grid {geometry.shape}")
    numbers = sorted(names)
    if not numbers or numbers != list(range(1, len(numbers) + 1)):
        raise InputError(f"{path}: segments must be numbered 1..N, got {numbers}")
    if labels.size and (labels.min() < 0 or labels.max() > numbers[-1]):
        raise InputError(f"{path}: label values {labels.min()}..{labels.max()} outside the {len(numbers)} segments")
    headers = headers if headers is not None else seg_source(source, series)
    where = f"{source}: series {headers[0].SeriesInstanceUID}"
    shape = (int(headers[0].Columns), int(headers[0].Rows), len(headers))
    affine = headers_affine(headers)
    tol = max(1e-3, 0.01 * float(min(geometry.spacing)))
    if labels.shape != shape or not np.allclose(affine, geometry.affine, atol=tol, rtol=0):
        raise GeometryError(f"{where}: the label map's grid ({'x'.join(map(str, labels.shape))}) does not match the "
                            f"sorted source slices ({'x'.join(map(str, shape))}); not writing a DICOM-SEG whose "
                            "frames could land on the wrong slices")
    frames = np.ascontiguousarray(np.transpose(labels, (2, 1, 0)))  # (x, y, z) -> (slices, rows, columns)
    frames = frames.astype(np.uint8 if numbers[-1] < 256 else np.uint16, copy=False)
    algorithm = hd.AlgorithmIdentificationSequence(name="segment", family=codes.cid7162.ArtificialIntelligence,
                                                   version=software_version())
    descriptions = []
    for number in numbers:
        category, kind = property_codes(names[number])
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=(names[number] or f"class {number}")[:64],
            segmented_property_category=category, segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            tracking_uid=hd.UID(), tracking_id=(names[number] or f"class {number}")[:64]))
    thickness = headers[0].get("SliceThickness")
    spacing = float(np.linalg.norm(affine[:3, 2]))
    measures = hd.PixelMeasuresSequence(pixel_spacing=[float(v) for v in headers[0].PixelSpacing],
                                        slice_thickness=float(thickness) if thickness not in (None, "") else spacing,
                                        spacing_between_slices=spacing)
    try:
        number = int(headers[0].get("SeriesNumber") or 0)
    except (TypeError, ValueError):
        number = 0
    highdicom_log = logging.getLogger("highdicom")
    level = highdicom_log.level
    highdicom_log.setLevel(logging.ERROR)  # its notes on empty frames and copied attributes are not the user's business
    try:
        seg = hd.seg.Segmentation(
            source_images=headers, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=number % 100000 + 1000,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
            manufacturer_model_name=MANUFACTURER, software_versions=software_version(), device_serial_number="0",
            series_description=SERIES_DESCRIPTION, content_label="SEGMENT",
            content_description="automatic segmentation by segment (3D U-Net)", pixel_measures=measures,
            omit_empty_frames=bool(frames.any()))  # an all-empty map keeps its frames: a SEG needs at least one
    except (ValueError, TypeError, AttributeError) as err:
        raise InputError(f"{where}: cannot make a DICOM-SEG of it ({str(err).strip().splitlines()[0]})") from None
    finally:
        highdicom_log.setLevel(level)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"{path.parent}: cannot create output folder ({err.strerror})") from None
    try:
        with replaced_atomically(path, SEG_SUFFIX) as tmp:
            seg.save_as(tmp)
            back = pydicom.dcmread(tmp, stop_before_pixels=True)
            referenced = {str(item.ReferencedSOPInstanceUID)
                          for item in back.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
            if (str(back.SOPClassUID) != SEG_STORAGE or int(back.NumberOfFrames) < 1
                    or str(back.ReferencedSeriesSequence[0].SeriesInstanceUID) != str(headers[0].SeriesInstanceUID)
                    or referenced != {str(ds.SOPInstanceUID) for ds in headers}
                    or str(back.FrameOfReferenceUID) != str(headers[0].FrameOfReferenceUID)):
                raise GeometryError(f"{path}: the written DICOM-SEG does not reference {where} as made; "
                                    "nothing was written")
    except OSError as err:
        raise InputError(f"{path}: cannot write ({err.strerror})") from None
    return path
