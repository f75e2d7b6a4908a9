"""What an MSD / nnU-Net `dataset.json` declares: label names and values, and the modality of each channel.

Both label forms are read: MSD's {"0": "background"} and nnU-Net v2's {"background": 0}; channels come from MSD's
`modality` or nnU-Net v2's `channel_names`. A file that is not a JSON object, or labels in a form we cannot read
(e.g. nnU-Net region lists), is one line naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

from segment.errors import InputError, few

_MRI_WORDS = ("mri", "mr", "t1", "t2", "flair", "adc", "dwi", "pd", "swi", "dce", "bold", "hbv")


def read_dataset_json(root: Path) -> dict[str, Any]:
    path = root / "dataset.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except PermissionError:
        raise InputError(f"{path}: cannot read this file (permission denied)") from None
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise InputError(f"{path}: expected a JSON object with 'labels' and 'modality'/'channel_names'")
    return meta


def declared_labels(meta: dict[str, Any], root: Path) -> dict[int, str]:
    """MSD form {"0": "background"} or nnU-Net v2 form {"background": 0} -> {0: "background"}."""
    raw = meta.get("labels")
    if not raw:
        return {}
    if not isinstance(raw, dict):
        raise InputError(f"{root / 'dataset.json'}: 'labels' must be a mapping, got {type(raw).__name__}")
    out: dict[int, str] = {}
    for key, value in raw.items():
        if str(key).strip().isdigit():
            out[int(key)] = str(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            out[value] = str(key)
        else:
            raise InputError(f"{root / 'dataset.json'}: label {key!r}: {value!r} is not supported; expected "
                             f'{{"0": "background"}} (MSD) or {{"background": 0}} (nnU-Net v2, no region lists)')
    out.setdefault(0, "background")
    return dict(sorted(out.items()))


def declared_modality(meta: dict[str, Any]) -> tuple[str, int | None]:
    """('ct' | 'mri' | other lower-case text | 'unknown', declared channel count or None)."""
    raw = meta.get("modality") or meta.get("channel_names")
    if not isinstance(raw, dict) or not raw:
        return ("unknown" if not isinstance(raw, str) else modality_kind(raw)), None
    names = [str(raw[k]) for k in sorted(raw, key=lambda k: int(k) if str(k).isdigit() else 0)]
    kinds = {modality_kind(n) for n in names}
    return (kinds.pop() if len(kinds) == 1 else modality_kind(names[0])), len(names)


def channel_kinds(meta: dict[str, Any]) -> list[str]:
    """Kind of each declared channel, in channel order ([] when dataset.json declares none)."""
    raw = meta.get("modality") or meta.get("channel_names")
    if isinstance(raw, str):
        return [modality_kind(raw)]
    if not isinstance(raw, dict):
        return []
    return [modality_kind(str(raw[k])) for k in sorted(raw, key=lambda k: int(k) if str(k).isdigit() else 0)]


def modality_kind(name: str) -> str:
    text = name.strip().lower()
    if text == "ct" or text.startswith("ct"):
        return "ct"
    if any(text.startswith(word) for word in _MRI_WORDS) or "mri" in text:
        return "mri"
    return text or "unknown"


def listing_note(meta: dict[str, Any], root: Path, found: Collection[str]) -> str | None:
    """One line when dataset.json's own list of training cases ("training", MSD) or their count ("numTraining") does
    not match the image/label pairs `found` in the folders, else None. The folders decide what is trained on, as in
    nnU-Net v2; the note keeps a curator's list from being silently overruled."""
    found = set(found)
    parts = []
    listed = meta.get("training")
    if isinstance(listed, list) and listed:
        names = set()
        for entry in listed:
            image = entry.get("image") if isinstance(entry, dict) else None
            if isinstance(image, str):
                base = Path(image).name
                names.add(next((base[: -len(s)] for s in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
                                if base.lower().endswith(s)), base))
        missing, unlisted = sorted(names - found), sorted(found - names)
        if missing:
            parts.append(f"{len(missing)} case(s) listed under \"training\" have no image/label pair in the folders "
                         f"({few(missing)})")
        if unlisted:
            parts.append(f"{len(unlisted)} pair(s) in the folders are not listed under \"training\" and are used "
                         f"anyway ({few(unlisted)})")
    count = meta.get("numTraining")
    if isinstance(count, int) and not isinstance(count, bool) and count != len(found) and not parts:
        parts.append(f"numTraining is {count} but {len(found)} image/label pair(s) are in the folders")
    if not parts:
        return None
    return f"{root / 'dataset.json'}: " + "; ".join(parts) + " (the files in the folders decide what is used)"
