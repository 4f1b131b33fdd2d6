"""Discovery of input cases: nnU-Net/MSD raw folders, CSV lists, or folders of DICOM series.

Case ids the user gives (nnU-Net file names, the CSV `case_id` column) are kept; ids that
would otherwise come from DICOM or file names are salted hashes, so no patient identifier
leaks into the store. The salt comes from `PrepareConfig.salt` or the LNFM_ID_SALT variable.
No folder name becomes a site either: the site is the one given, the dataset's own, or
UNSPECIFIED_SITE (a DICOM folder is often named after the patient).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from lnfm.config import ConfigError
from lnfm.io import ImageReadError, is_dicom_path, series_uid
from lnfm.io.dicom import describe_series, dicom_files, series_of, split_series, split_series_reason

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr")
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SALT_ENV = "LNFM_ID_SALT"
UNSPECIFIED_SITE = "unspecified"


@dataclass
class CaseSpec:
    """One input case before conversion."""

    case_id: str
    images: list[str]  # one path per channel (CT first, then e.g. PET)
    label: str | None = None
    site: str = ""
    split: str | None = None  # set by the CSV `split` column; else derived from the id
    channels: list[str] = field(default_factory=lambda: ["CT"])
    series: str | None = None  # SeriesInstanceUID to read from a DICOM folder holding several series


@dataclass
class InputError:
    file: str
    reason: str


def hashed_id(text: str, salt: str) -> str:
    """Pseudonymous case id: 'c' + 16 hex digits of sha256(salt, text)."""
    return "c" + hashlib.sha256(f"{salt}\0{text}".encode()).hexdigest()[:16]


def resolve_salt(salt: str) -> str:
    return salt or os.environ.get(SALT_ENV, "")


def assign_split(case_id: str, seed: int, fractions: tuple[float, float, float]) -> str:
    """Deterministic train/val/test from a hash of (seed, case_id)."""
    total = sum(fractions)
    if total <= 0 or min(fractions) < 0:
        raise ConfigError(f"split fractions {fractions} must be non-negative and not all zero")
    u = int.from_bytes(hashlib.sha256(f"{seed}:{case_id}".encode()).digest()[:8], "big") / 2**64
    edges = [sum(fractions[: i + 1]) / total for i in range(3)]
    return "train" if u < edges[0] else "val" if u < edges[1] else "test"


def _strip_suffix(name: str) -> str | None:
    for suf in IMAGE_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return None


def discover_nnunet(root: Path, site: str) -> tuple[list[CaseSpec], list[InputError]]:
    meta_path = root / "dataset.json"
    meta = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            return [], [InputError(str(meta_path), f"not valid JSON ({e.msg})")]
    site = site or str(meta.get("site", "")) or UNSPECIFIED_SITE
    # A multi-site folder (e.g. phantoms made with --site all) records the site per case.
    case_sites = {str(c.get("case")): str(c["site"]) for c in meta.get("cases", [])
                  if isinstance(c, dict) and c.get("site")}
    names = meta.get("channel_names") or meta.get("modality") or {"0": "CT"}
    n_channels = len(names)
    channels = [str(names[str(i)]) for i in range(n_channels)] if all(str(i) in names for i in range(n_channels)) \
        else ["CT"] * n_channels
    declared = ", ".join(f"{i:04d} {c}" for i, c in enumerate(channels))
    declared = f"dataset.json declares {declared}" if meta_path.is_file() else "no dataset.json: 0000 CT only"
    cases, errors = [], []
    train_ids: set[str] = set()
    for folder, labelled in (("imagesTr", True), ("imagesTs", False)):
        found: dict[str, dict[int, Path]] = {}
        for p in sorted((root / folder).glob("*")) if (root / folder).is_dir() else []:
            stem = _strip_suffix(p.name)
            if stem is None:  # not an image file (e.g. the data file beside an .nhdr header)
                continue
            m = re.match(r"^(.*)_(\d{4})$", stem)
            if not m:  # nnU-Net would not read it either: said, not passed over with its label
                errors.append(InputError(str(p), "name lacks the _NNNN channel suffix nnU-Net uses (CASE_0000 for "
                                                 "CT, CASE_0001 for PET)"))  # the name itself stays out of the store
                continue
            found.setdefault(m.group(1), {})[int(m.group(2))] = p
        for cid, chans in found.items():
            if labelled:
                train_ids.add(cid)
            missing = [i for i in range(n_channels) if i not in chans]
            if missing:
                errors.append(InputError(str(root / folder / f"{cid}_{missing[0]:04d}"), "missing file (channel)"))
            # A channel the dataset does not declare fails its case: either dataset.json lacks it (then every
            # case would be stored without it) or the file does not belong there.
            extra = sorted(i for i in chans if i >= n_channels)
            errors += [InputError(str(chans[i]), f"channel {i:04d} is not declared ({declared}); declare it in "
                                                 f"dataset.json or move the file away") for i in extra]
            if missing or extra:
                continue
            label = None
            if labelled:
                ext = next((s for s in IMAGE_SUFFIXES if chans[0].name.endswith(s)), ".nii.gz")
                label_path = root / "labelsTr" / f"{cid}{meta.get('file_ending', ext)}"
                label = str(label_path)
            case_site = site if site != "all" else case_sites.get(cid, site)
            cases.append(CaseSpec(cid, [str(chans[i]) for i in range(n_channels)], label, case_site, None, channels))
    for p in sorted((root / "labelsTr").glob("*")) if (root / "labelsTr").is_dir() else []:
        stem = _strip_suffix(p.name)
        if stem is not None and stem not in train_ids:  # a label whose image is missing or misnamed
            errors.append(InputError(str(p), f"label without an image: no imagesTr/{stem}_0000 file"))
    return cases, errors


def _choose_series(folder: Path, series: list[str]) -> str | None:
    """The SeriesInstanceUID to read from a DICOM folder: None when it holds one series, the one
    listed in `series` when it holds several; ImageReadError (listing them) otherwise."""
    groups = {uid: files for uid, files in series_of(dicom_files(folder))[0].items() if uid}
    if len(groups) <= 1:
        return None
    chosen = [uid for uid in groups if uid in series]
    if len(chosen) != 1:
        raise ImageReadError(f"{folder}: folder holds {len(groups)} DICOM series: {describe_series(groups)}; "
                             f"choose one with --series UID")
    return chosen[0]


CSV_COLUMNS = ("case_id", "image", "label", "site", "pet", "split")


def discover_csv(path: Path, site: str, salt: str, series: list[str] = ()) -> tuple[list[CaseSpec], list[InputError]]:
    base = path.parent
    # utf-8-sig: spreadsheets write a byte-order mark that would otherwise rename the first column.
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = set(reader.fieldnames or [])
            if "image" not in fields:
                return [], [InputError(str(path), "CSV has no 'image' column (expected "
                                                  "case_id,image,label,site[,pet][,split])")]
            # A column prepare does not read (a 'Label' or 'PET' spelled otherwise) would drop the case's label
            # or PET without a word.
            unknown = sorted(f for f in fields if f not in CSV_COLUMNS)
            if unknown:
                return [], [InputError(str(path), f"CSV column '{unknown[0]}' is not one prepare reads (the columns "
                                                  f"are {','.join(CSV_COLUMNS)}; names are case-sensitive)")]
            rows = list(reader)
    except UnicodeDecodeError:
        return [], [InputError(str(path), "CSV is not UTF-8 text")]
    except csv.Error as e:
        return [], [InputError(str(path), f"malformed CSV ({e})")]
    cases, errors = [], []
    for row in rows:
        def resolve(key: str) -> str | None:
            value = (row.get(key) or "").strip()
            return str((base / value) if not Path(value).is_absolute() else Path(value)) if value else None

        image = resolve("image")
        if image is None:
            errors.append(InputError(str(path), "a row has an empty 'image'"))
            continue
        images = [image] + ([p] if (p := resolve("pet")) else [])
        cid = (row.get("case_id") or "").strip()
        chosen = None
        if Path(image).is_dir():
            try:
                chosen = _choose_series(Path(image), list(series))
            except ImageReadError as e:
                errors.append(InputError(image, str(e).split(": ", 1)[-1]))
                continue
        if not cid:
            key = series_uid(image, chosen) if is_dicom_path(image) and Path(image).exists() \
                else str(Path(image).absolute())
            cid = hashed_id(key, salt)
        split = (row.get("split") or "").strip() or None
        if split not in (None, "train", "val", "test"):
            errors.append(InputError(image, f"split '{split}' is not train, val or test"))
            continue
        cases.append(CaseSpec(cid, images, resolve("label"), (row.get("site") or "").strip() or site
                              or UNSPECIFIED_SITE, split, ["CT"] + (["PET"] if len(images) > 1 else []), chosen))
    return cases, errors


def discover_dicom(root: Path, salt: str, site: str, series: list[str] = ()) -> tuple[list[CaseSpec], list[InputError]]:
    """Every folder holding DICOM files is one series = one case, with a hashed id. A folder
    holding several series is an error listing them, unless `series` names the one to take."""
    cases, errors, uids = [], [], {}
    folders = [root] + sorted(p for p in root.rglob("*") if p.is_dir())
    for folder in folders:
        files = dicom_files(folder)
        if not files:
            continue
        try:
            chosen = _choose_series(folder, list(series))
            uid = series_uid(folder, chosen)
        except ImageReadError as e:
            errors.append(InputError(str(folder), str(e).split(": ", 1)[-1]))
            continue
        except Exception:
            errors.append(InputError(str(folder), "unreadable DICOM header"))
            continue
        cases.append(CaseSpec(hashed_id(uid or str(folder.absolute()), salt), [str(folder)], None,
                              site or UNSPECIFIED_SITE, series=chosen))
        uids[str(folder)] = uid
    split = split_series(uids)
    errors += [InputError(c.images[0], split_series_reason(split[c.images[0]])) for c in cases if c.images[0] in split]
    return [c for c in cases if c.images[0] not in split], errors


def discover(input_path: str, site: str = "", salt: str = "", series: list[str] = ()
             ) -> tuple[list[CaseSpec], list[InputError]]:
    """Cases and input-level errors for a CSV, an nnU-Net/MSD folder or a folder of DICOM series."""
    path = Path(input_path)
    if not path.exists():
        return [], [InputError(str(path), "input not found")]
    if path.is_file() and path.suffix.lower() == ".csv":
        return discover_csv(path, site, salt, series)
    if path.is_dir() and ((path / "imagesTr").is_dir() or (path / "imagesTs").is_dir()):
        return discover_nnunet(path, site)
    if path.is_dir():
        return discover_dicom(path, salt, site, series)
    return [], [InputError(str(path), "input must be a CSV file, an nnU-Net/MSD folder or a folder of DICOM series")]


def drop_duplicates(cases: list[CaseSpec]) -> tuple[list[CaseSpec], list[InputError]]:
    """Keep the first case of each id; later ones become errors. Unsafe ids are errors too, and so
    is a case listed again under another id (the same image and label files: it could land in two
    splits, training on a test case)."""
    seen: dict[str, CaseSpec] = {}
    scans: dict[tuple, str] = {}
    errors = []
    for c in cases:
        scan = (tuple(os.path.realpath(p) for p in c.images), c.series, c.label and os.path.realpath(c.label))
        if not SAFE_ID.match(c.case_id):
            errors.append(InputError(c.images[0],
                                     f"case id '{c.case_id}' may only hold letters, digits, '.', '_', '-'"))
        elif c.case_id in seen:
            errors.append(InputError(c.images[0],
                                     f"duplicate case id '{c.case_id}' (first: {seen[c.case_id].images[0]})"))
        elif scan in scans:
            errors.append(InputError(c.images[0], f"case '{c.case_id}' lists the image and label of case "
                                                  f"'{scans[scan]}' again; each case may be listed once"))
        else:
            seen[c.case_id] = c
            scans[scan] = c.case_id
    return list(seen.values()), errors
