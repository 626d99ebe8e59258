"""Ingest: turn a messy dataset folder or zip into a clean manifest and a report of everything left out.

Every file found ends up either in the manifest or in `report["skipped"]` with one reason; nothing
is dropped silently. Each kept image was read, hashed and fully decoded with the same decoder
training and prediction use, so later stages never meet an unreadable file.

`label_files` is the one labelling rule (class folders, or the labels CSV, `parse_labels_csv`):
`glomeruli predict` calls it too, with the layout the model's metadata records, so a labelled folder is scored
against the labels ingest would give it. `ingest.group_regex` reads each file's biopsy id (`group_of`, shared
with `predict --by-biopsy`) and `ingest.site_regex` its site (`layout.SINGLE_SITE`, "all", when null); the
store carries both into split and evaluation.
"""

from __future__ import annotations

import codecs
import csv
import io
import logging
import mimetypes
import re
import unicodedata
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath
from typing import Any


from glomeruli.core.csvcells import original_cell, spreadsheet_safe
from glomeruli.core.errors import UserError
from glomeruli.data.images import ImageError, ImageInfo, ImageTooLargeError, content_hash, decode_rgb, probe_image
from glomeruli.data.layout import BIOPSY_PREFIX, MARKER_FILE, SINGLE_SITE
from glomeruli.core.logs import progress
from glomeruli.core.parallel import ordered_map, resolve_workers
from glomeruli.data.sources import Entry, SourceError, image_max_bytes, list_entries, read_bytes, read_labels_file

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("id", "path", "name", "label", "group", "site", "sha256", "width", "height", "channels")
# Manifests written before ingest.site_regex: read with every image at SINGLE_SITE.
_MANIFEST_COLUMNS_WITHOUT_SITE = tuple(c for c in MANIFEST_COLUMNS if c != "site")
LABELS_CSV_HEADER = ("name", "ground truth")
VALID_LABELS = (0, 1)
_FIRST_BAD_FILES_SHOWN = 5


class IngestError(UserError, RuntimeError):
    """The dataset cannot be used as it is: the message names the file or setting and the fix."""


@dataclass(frozen=True)
class ManifestRow:
    id: str
    path: str
    name: str
    label: int
    group: str
    sha256: str
    width: int
    height: int
    channels: int
    site: str = SINGLE_SITE  # hospital / scanner / series (ingest.site_regex)


@dataclass(frozen=True)
class IngestConfig:
    class_dirs: dict[str, int]
    labels_csv: str | None
    group_regex: str
    max_pixels: int
    max_unreadable_fraction: float
    workers: int = 0
    site_regex: str | None = None  # None: every image at SINGLE_SITE


@dataclass(frozen=True)
class IngestResult:
    rows: list[ManifestRow]
    report: dict


@dataclass(frozen=True)
class _Candidate:
    relpath: str
    folder: str
    label: int
    size: int

    @property
    def name(self) -> str:
        return PurePosixPath(self.relpath).name

    @property
    def match_name(self) -> str:
        return _match_name(self.relpath)


@dataclass(frozen=True)
class _Inspected:
    relpath: str
    sha256: str | None = None
    info: ImageInfo | None = None
    error: str | None = None


@dataclass(frozen=True)
class LabelsCsv:
    """A parsed labels csv: usable labels, names to exclude, and what was wrong with it."""

    labels: dict[str, int]       # NFC file name -> label, for names with one consistent valid label
    excluded: dict[str, str]     # NFC file name -> why its image is excluded (bad or conflicting labels)
    rows_by_name: dict[str, list[dict]]  # NFC file name -> its csv rows, to report extra rows
    report: dict


class _Skips:
    """Collects one reason per file left out, for report["skipped"]."""

    def __init__(self) -> None:
        self.items: list[dict[str, str]] = []

    def add(self, relpath: str, reason: str) -> None:
        self.items.append({"file": relpath, "reason": reason})

    def sorted(self) -> list[dict[str, str]]:
        return sorted(self.items, key=lambda s: (s["file"], s["reason"]))


# ---------------------------------------------------------------------------------------- ingest

def ingest_dataset(source: Path, config: IngestConfig) -> IngestResult:
    """List, label, read, hash and decode every image of `source`; report everything left out."""
    source = Path(source)
    group_pattern = compile_group_regex(config.group_regex)
    site_pattern = compile_site_regex(config.site_regex)
    entries, listing_skipped = list_entries(source)
    skips = _Skips()
    for item in listing_skipped:
        skips.add(item.relpath, item.reason)
    warnings: list[str] = []

    csv_entry = next((e for e in entries if config.labels_csv is not None and e.relpath == config.labels_csv), None)
    _refuse_synthetic_mixed_with_real(
        source, entries, {e.relpath for e in entries if _class_folder_of(e.relpath, config.class_dirs)}, csv_entry)
    csv_labels = _load_labels_csv(source, config, csv_entry, warnings)
    labelling = label_files([e.relpath for e in entries], config.class_dirs, config.labels_csv, csv_labels)
    for relpath, reason in labelling.refused.items():
        skips.add(relpath, reason)
    candidates = [_Candidate(e.relpath, folder, config.class_dirs[folder], e.size)
                  for e in entries if (folder := labelling.class_files.get(e.relpath))]
    labelled = [c for c in candidates if c.relpath in labelling.labels]
    sites, no_site = _sites(labelled, site_pattern)
    for relpath in no_site:  # before reading: an image of no site is not part of the data
        skips.add(relpath, f"no site: the name does not match ingest.site_regex = {config.site_regex!r}; rename "
                           "the file or fix the regex (null: every image at one site)")
    survivors = [c for c in labelled if c.relpath in sites]
    to_read, unreadable = _drop_oversized_files(survivors, config.max_pixels)
    inspected = _inspect_all(source, [c.relpath for c in to_read], config.max_pixels, config.workers)
    decoded: list[tuple[_Candidate, _Inspected]] = []
    for candidate, result in zip(to_read, inspected, strict=True):
        if result.error:
            unreadable.append({"file": candidate.relpath, "reason": result.error})
        else:
            decoded.append((candidate, result))
    unreadable.sort(key=lambda u: u["file"])
    for item in unreadable:
        skips.add(item["file"], item["reason"])

    kept, duplicates = _drop_duplicates(decoded, skips)
    rows, ungrouped = _manifest_rows(kept, group_pattern, sites)

    csv_extra = _csv_extra_rows(candidates, csv_labels, warnings)
    report = _build_report(
        source, config, n_listed=len(entries) + len(listing_skipped), candidates=candidates, rows=rows,
        unreadable=unreadable, skips=skips, outside=labelling.outside, duplicates=duplicates,
        label_conflicts=labelling.label_conflicts, in_both=labelling.in_both, csv_labels=csv_labels,
        csv_extra=csv_extra, csv_missing=labelling.csv_missing, ungrouped=ungrouped, no_site=no_site,
        folders_found=sorted({e.relpath.split("/")[0] for e in entries if "/" in e.relpath}), warnings=warnings,
        marker=any(e.relpath == MARKER_FILE for e in entries))
    log.info("ingest: %d images kept of %d found in the class folders; %d unreadable, %d files skipped in all",
             len(rows), len(candidates), len(unreadable), len(report["skipped"]))
    return IngestResult(rows=rows, report=report)


def compile_group_regex(pattern: str) -> re.Pattern[str]:
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise IngestError(f"ingest.group_regex = {pattern!r} is not a regular expression ({err})") from None
    if "group" not in compiled.groupindex:
        raise IngestError(f"ingest.group_regex = {pattern!r} has no named group; write it as "
                          "'^(?P<group>.+?)_PAS_' so the biopsy id can be read from the file name")
    return compiled


def compile_site_regex(pattern: str | None) -> re.Pattern[str] | None:
    """ingest.site_regex compiled; None (every image at SINGLE_SITE) when it is null."""
    if pattern is None:
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise IngestError(f"ingest.site_regex = {pattern!r} is not a regular expression ({err}); "
                          "or set it to null for one site") from None
    if "site" not in compiled.groupindex:
        raise IngestError(f"ingest.site_regex = {pattern!r} has no named group (?P<site>...); write it as e.g. "
                          "'^SYNTH-(?P<site>SITE\\d+)_', or set it to null for one site")
    return compiled


def _sites(candidates: list[_Candidate], site_pattern: re.Pattern[str] | None) -> tuple[dict[str, str], list[str]]:
    """Each file's site from its name (as group_of reads the biopsy id), and the files whose name gives none."""
    if site_pattern is None:
        return {c.relpath: SINGLE_SITE for c in candidates}, []
    sites, no_site = {}, []
    for candidate in candidates:
        match = site_pattern.search(candidate.name)
        if match and match.group("site"):
            sites[candidate.relpath] = match.group("site")
        else:
            no_site.append(candidate.relpath)
    return sites, sorted(no_site)


def group_of(name: str, group_pattern: re.Pattern[str]) -> str | None:
    """The biopsy id in a file name (`ingest.group_regex`), None when the name does not carry one.
    Shared by ingest and `glomeruli predict --by-biopsy`."""
    match = group_pattern.search(name)
    return match.group("group") if match else None


def _refuse_synthetic_mixed_with_real(source: Path, entries: list[Entry], in_class_folders: set[str],
                                      csv_entry: Entry | None) -> None:
    """A folder marked as synthetic sample data must hold nothing else: a model trained on a mixture is wrong."""
    if not any(e.relpath == MARKER_FILE for e in entries):
        return
    own = {MARKER_FILE, csv_entry.relpath if csv_entry else None}
    foreign = [e.relpath for e in entries
               if e.relpath not in own and not PurePosixPath(e.relpath).name.startswith(BIOPSY_PREFIX)
               and (e.relpath in in_class_folders or (mimetypes.guess_type(e.relpath)[0] or "").startswith("image/"))]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise IngestError(
            f"{source} holds the synthetic sample data (its marker {MARKER_FILE}) together with {len(foreign)} "
            f"image(s) that are not synthetic ({shown}): keep the sample data in its own folder (e.g. data/sample) "
            "and point data.source at a folder holding only your own data")


def _drop_oversized_files(candidates: list[_Candidate], max_pixels: int) -> tuple[list[_Candidate], list[dict]]:
    """Files too big to be an image of max_pixels, refused before reading (they count as unreadable)."""
    limit = image_max_bytes(max_pixels)  # e.g. a zip member that would inflate to gigabytes
    kept, refused = [], []
    for candidate in candidates:
        if candidate.size > limit:
            refused.append({"file": candidate.relpath,
                            "reason": f"too large: {candidate.size} bytes, more than any image of "
                                      f"ingest.max_pixels = {max_pixels} pixels can be; not read"})
        else:
            kept.append(candidate)
    return kept, refused


def _drop_duplicates(decoded, skips: _Skips):
    """Keep the first (by id) of identical files; drop all copies whose labels disagree."""
    by_hash = defaultdict(list)
    for candidate, result in decoded:
        by_hash[result.sha256].append((candidate, result))
    kept, duplicates = [], []
    for sha256 in sorted(by_hash, key=lambda h: by_hash[h][0][0].relpath):
        copies = by_hash[sha256]
        if len(copies) == 1:
            kept.append(copies[0])
            continue
        files = [c.relpath for c, _ in copies]
        labels = sorted({c.label for c, _ in copies})
        if len(labels) == 1:
            first = files[0]
            kept.append(copies[0])
            for relpath in files[1:]:
                skips.add(relpath, f"duplicate of {first}")
            duplicates.append({"sha256": sha256, "files": files, "labels": labels, "kept": first})
        else:
            for relpath in files:
                skips.add(relpath, "duplicate with conflicting labels")
            duplicates.append({"sha256": sha256, "files": files, "labels": labels, "kept": None})
    kept.sort(key=lambda pair: pair[0].relpath)
    return kept, duplicates


def _manifest_rows(kept, group_pattern: re.Pattern[str],
                   sites: Mapping[str, str]) -> tuple[list[ManifestRow], list[str]]:
    rows, ungrouped = [], []
    for candidate, result in kept:
        group = group_of(candidate.name, group_pattern)
        if not group:
            group = candidate.name  # its own group: it can never share a split partition with others
            ungrouped.append(candidate.relpath)
        info = result.info
        rows.append(ManifestRow(id=candidate.relpath, path=candidate.relpath, name=candidate.name,
                                label=candidate.label, group=group, site=sites[candidate.relpath],
                                sha256=result.sha256, width=info.width, height=info.height, channels=info.channels))
    return rows, ungrouped


# ---------------------------------------------------------------------------------------- labelling

@dataclass(frozen=True)
class Labelling:
    """Ingest's labelling rule applied to a dataset's files: each is kept with a label or refused with one reason.

    Paths are relative to the dataset root as `sources.list_entries` gives them (a wrapper folder removed).
    Ingest reads exactly the files of `labels` (and then drops unreadable files and duplicates); predict
    scores a labelled folder against `labels` and nothing else.
    """

    labels: dict[str, int]         # file -> its label, for every file kept
    refused: dict[str, str]        # file -> why it takes no label (outside the class folders, ambiguous, contradicted)
    class_files: dict[str, str]    # file -> its class folder, for every file directly inside one (kept or refused)
    outside: list[str]             # files not directly inside a class folder (the labels file excepted)
    labels_file: str | None        # the labels csv among the files: read, neither kept nor refused
    in_both: dict[str, list[str]]  # NFC file name -> its files, for names found in more than one class folder
    label_conflicts: list[dict]    # {"file", "folder_label", "csv_label"}: its class folder and the csv disagree
    csv_missing: list[str]         # files kept with their folder label because the csv has no row for them


def label_files(relpaths: Sequence[str], class_dirs: Mapping[str, int], labels_csv: str | None,
                csv: LabelsCsv | None) -> Labelling:
    """The one labelling rule, ingest's and predict's.

    Only a file directly inside a class folder (`class_dirs`: folder -> label) takes a label, its folder's; it is
    refused when its name (compared as NFC) is in more than one class folder, when the labels csv (`csv`, parsed
    from the file `labels_csv`; None when absent or not set) excludes the name (an invalid label, or rows that
    disagree) or gives it the other label. Every other file is outside, and refused as such.
    """
    class_files: dict[str, str] = {}
    outside: list[str] = []
    labels_file = None
    for relpath in relpaths:
        folder = _class_folder_of(relpath, class_dirs)
        if labels_csv is not None and relpath == labels_csv:
            labels_file = relpath
        elif folder is not None:
            class_files[relpath] = folder
        else:
            outside.append(relpath)
    refused = {relpath: f"outside the class folders (only files directly inside {', '.join(sorted(class_dirs))} "
                        "are used)" for relpath in outside}
    in_both = _names_in_both_classes(class_files)
    labels: dict[str, int] = {}
    conflicts, missing = [], []
    for relpath, folder in class_files.items():
        name, folder_label = _match_name(relpath), class_dirs[folder]
        if name in in_both:
            refused[relpath] = ("name_in_both_classes: the same file name is in both class folders; "
                                "its label is ambiguous, keep it in one folder only")
        elif csv is None:
            labels[relpath] = folder_label
        elif name in csv.excluded:
            refused[relpath] = csv.excluded[name]
        elif name not in csv.labels:
            missing.append(relpath)  # the folder label stands
            labels[relpath] = folder_label
        elif csv.labels[name] != folder_label:
            conflicts.append({"file": relpath, "folder_label": folder_label, "csv_label": csv.labels[name]})
            refused[relpath] = (f"label conflict: folder '{folder}' says {folder_label}, {csv.report['file']} says "
                                f"{csv.labels[name]}; fix one of them")
        else:
            labels[relpath] = folder_label
    return Labelling(labels=labels, refused=refused, class_files=class_files, outside=outside,
                     labels_file=labels_file, in_both=in_both, label_conflicts=conflicts, csv_missing=missing)


def _class_folder_of(relpath: str, class_dirs: Mapping[str, int]) -> str | None:
    parts = relpath.split("/")
    return parts[0] if len(parts) == 2 and parts[0] in class_dirs else None


def _match_name(relpath: str) -> str:
    # macOS stores names decomposed (NFD), spreadsheets type them composed (NFC): compare both as NFC.
    return unicodedata.normalize("NFC", PurePosixPath(relpath).name)


def _names_in_both_classes(class_files: Mapping[str, str]) -> dict[str, list[str]]:
    """NFC file name -> its files, for names that appear in more than one class folder."""
    folders, files = defaultdict(set), defaultdict(list)
    for relpath, folder in class_files.items():
        folders[_match_name(relpath)].add(folder)
        files[_match_name(relpath)].append(relpath)
    return {name: sorted(files[name]) for name in sorted(files) if len(folders[name]) > 1}


# ---------------------------------------------------------------------------------------- reading

def _inspect(task: tuple[str, str, int]) -> _Inspected:
    """Read, hash and fully decode one file (in a worker process)."""
    source, relpath, max_pixels = task
    try:
        data = read_bytes(Path(source), relpath, image_max_bytes(max_pixels))
    except (OSError, SourceError) as err:
        return _Inspected(relpath, error=f"unreadable: cannot read the file ({err})")
    try:
        info = probe_image(data, relpath, max_pixels)
        decode_rgb(data, relpath, max_pixels)  # a full decode is the only reliable truncation check
    except ImageTooLargeError as err:
        return _Inspected(relpath, error=f"too large: {err}")
    except ImageError as err:
        return _Inspected(relpath, error=f"unreadable: {err}")
    return _Inspected(relpath, sha256=content_hash(data), info=info)


def _inspect_all(source: Path, relpaths: list[str], max_pixels: int, workers: int) -> list[_Inspected]:
    """Inspect files in sorted order; results come back in the same order whatever the worker count."""
    tasks = [(str(source), relpath, max_pixels) for relpath in relpaths]
    n_workers = max(1, min(resolve_workers(workers), len(tasks)))
    log.info("ingest: reading %d images with %d worker process(es)", len(tasks), n_workers)
    return list(progress(ordered_map(_inspect, tasks, n_workers), len(tasks), "ingest"))


# ---------------------------------------------------------------------------------------- labels csv

def _load_labels_csv(source: Path, config: IngestConfig, csv_entry: Entry | None,
                     warnings: list[str]) -> LabelsCsv | None:
    if config.labels_csv is None:
        return None
    if csv_entry is None:
        message = (f"ingest.labels_csv = {config.labels_csv!r} is not in {source}; labels come from the "
                   "class folders only (set ingest.labels_csv: null to silence this)")
        log.warning(message)
        warnings.append(message)
        return None
    return parse_labels_csv(read_labels_file(source, csv_entry.relpath), config.labels_csv)


def parse_labels_csv(data: bytes, file: str) -> LabelsCsv:
    """Parse `name,ground truth` rows; bad rows are reported, a wrong header is an error."""
    has_bom = data.startswith(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8-sig")  # Excel writes a BOM; it is not part of the header
    except UnicodeDecodeError as err:
        raise IngestError(f"{file}: not UTF-8 text ({err}); save it as 'CSV UTF-8'") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    expected = ",".join(LABELS_CSV_HEADER)
    if not rows:
        raise IngestError(f"{file}: empty; expected the header '{expected}' and one row per image, "
                          "or set ingest.labels_csv: null")
    header = [cell.strip() for cell in rows[0][1]]
    if tuple(header) != LABELS_CSV_HEADER:
        raise IngestError(f"{file}: header is {','.join(header)!r}, expected {expected!r}; fix the header, "
                          "or set ingest.labels_csv: null to use the folder labels only")

    bad_rows, bad_labels, duplicate_rows = [], [], []
    rows_by_name: dict[str, list[dict]] = defaultdict(list)
    for line, row in rows[1:]:
        cells = [cell.strip() for cell in row]
        if len(cells) != 2:
            bad_rows.append({"line": line, "row": row, "reason": f"expected 2 columns, found {len(cells)}"})
            continue
        name, label = unicodedata.normalize("NFC", cells[0]), cells[1]
        if not name or "/" in name or "\\" in name:
            bad_rows.append({"line": line, "row": row, "reason": "expected a bare file name (no folder)"})
            continue
        rows_by_name[name].append({"line": line, "name": name, "label": label})

    labels, excluded, conflicting = {}, {}, []
    for name, name_rows in rows_by_name.items():
        values = {r["label"] for r in name_rows}
        invalid = sorted(v for v in values if v not in {str(v) for v in VALID_LABELS})
        if invalid:
            bad_labels.extend(r for r in name_rows if r["label"] in invalid)
            excluded[name] = (f"{file} line {name_rows[0]['line']}: label {invalid[0]!r} is not 0 or 1; "
                              "fix the csv row")
        elif len(values) > 1:
            conflicting.append({"name": name, "rows": name_rows})
            excluded[name] = f"{file} gives conflicting labels {sorted(values)} for this name; keep one row"
        else:
            labels[name] = int(values.pop())
            if len(name_rows) > 1:
                duplicate_rows.extend(name_rows[1:])
    report = {"file": file, "present": True, "bom": has_bom, "crlf": "\r\n" in text, "n_rows": len(rows) - 1,
              "bad_rows": bad_rows, "bad_labels": sorted(bad_labels, key=lambda r: r["line"]),
              "conflicting_rows": conflicting, "duplicate_rows": duplicate_rows}
    return LabelsCsv(labels=labels, excluded=excluded, rows_by_name=dict(rows_by_name), report=report)


# ---------------------------------------------------------------------------------------- report

def _config_report(config: IngestConfig) -> dict:
    # workers is left out on purpose: the report must not depend on how many processes read the files.
    return {f.name: getattr(config, f.name) for f in fields(config) if f.name != "workers"}


def _csv_extra_rows(candidates: list[_Candidate], csv_labels: LabelsCsv | None, warnings: list[str]) -> list[dict]:
    """Csv rows naming no image in the class folders (and a warning when no row matches at all)."""
    if csv_labels is None:
        return []
    image_names = {c.match_name for c in candidates}
    extra = [r for name, name_rows in csv_labels.rows_by_name.items() if name not in image_names for r in name_rows]
    if csv_labels.rows_by_name and image_names and image_names.isdisjoint(csv_labels.rows_by_name):
        message = (f"none of the {len(csv_labels.rows_by_name)} names in {csv_labels.report['file']} matches an "
                   "image file name; write bare file names with their extension, e.g. x_PAS_1of2_<hex>.png")
        log.warning(message)
        warnings.append(message)
    return sorted(extra, key=lambda r: r["line"])


def _build_report(source: Path, config: IngestConfig, *, n_listed: int, candidates: list[_Candidate],
                  rows: list[ManifestRow], unreadable: list[dict], skips: _Skips, outside: list[str],
                  duplicates: list[dict], label_conflicts: list[dict], in_both: dict[str, list[str]],
                  csv_labels: LabelsCsv | None, csv_extra: list[dict], csv_missing: list[str],
                  ungrouped: list[str], no_site: list[str], folders_found: list[str], warnings: list[str],
                  marker: bool) -> dict:
    counts = {}
    for folder in sorted(config.class_dirs):
        counts[folder] = {"label": config.class_dirs[folder],
                          "found": sum(c.folder == folder for c in candidates),
                          "kept": sum(r.path.split("/")[0] == folder for r in rows)}
    # Images kept per site and label: a site holding one class only is the user's to judge (split.group_by: site).
    sites: dict[str, dict] = {}
    for row in sorted(rows, key=lambda r: r.site):
        site = sites.setdefault(row.site, {"n": 0, "by_label": {str(label): 0 for label in VALID_LABELS}})
        site["n"] += 1
        site["by_label"][str(row.label)] += 1
    # Whether the model will be trained on our synthetic sample data: the marker, or any kept image carrying the
    # synthetic biopsy prefix (a copy without its marker). The model card shouts it; nothing downstream guesses.
    n_synthetic = sum(PurePosixPath(r.path).name.startswith(BIOPSY_PREFIX) for r in rows)
    return {
        "source": str(source),
        "config": _config_report(config),
        "n_listed": n_listed,
        "n_found": len(candidates),
        "n_kept": len(rows),
        "n_unreadable": len(unreadable),
        "n_groups": len({r.group for r in rows}),
        "synthetic": marker or n_synthetic > 0,
        "synthetic_marker": marker,
        "n_synthetic": n_synthetic,
        "counts": counts,
        "n_sites": len(sites),
        "sites": sites,
        "folders_found": folders_found,
        "skipped": skips.sorted(),
        "unreadable": unreadable,
        "outside_class_folders": sorted(outside),
        "duplicates": duplicates,
        "label_conflicts": label_conflicts,
        "name_in_both_classes": [{"name": name, "files": files} for name, files in in_both.items()],
        "csv": csv_labels.report if csv_labels else {"file": config.labels_csv, "present": False},
        "csv_extra_rows": csv_extra,
        "csv_missing_rows": sorted(csv_missing),
        "ungrouped": sorted(ungrouped),
        "no_site": no_site,
        "warnings": warnings,
    }


def check_ingest(result: IngestResult, config: IngestConfig) -> None:
    """Refuse a dataset with an empty class or too many unreadable images."""
    report = result.report
    for folder in sorted(config.class_dirs):
        counts = report["counts"].get(folder)
        if counts is None:
            raise IngestError(f"the ingest report has no class folder '{folder}': it was made with other "
                              "ingest.class_dirs; run ingest again")
        if counts["kept"] == 0:
            no_site = [f for f in report.get("no_site", []) if f.split("/")[0] == folder]
            if no_site:
                raise IngestError(
                    f"class folder '{folder}' (label {counts['label']}) has no usable images: {len(no_site)} of its "
                    f"images have names that ingest.site_regex = {config.site_regex!r} does not match (e.g. "
                    f"{no_site[0]}); fix the regex, or set it to null to put every image at one site")
            folder_skipped = [s["reason"] for s in report["skipped"] if s["file"] == folder]
            why = f" The folder itself was skipped: {folder_skipped[0]}." if folder_skipped else ""
            raise IngestError(
                f"class folder '{folder}' (label {counts['label']}) has no usable images in {report['source']} "
                f"({counts['found']} files found there); folders found: {report['folders_found'] or 'none'}.{why} "
                f"The class folders must sit at the top of {report['source']} or inside exactly one wrapper folder "
                f"(a folder and a zip alike): put the images in {folder}/ there, or fix ingest.class_dirs / "
                "data.source (the ingest report's `skipped` list says why each file was left out)")
    n_unreadable, n_kept = report["n_unreadable"], report["n_kept"]
    fraction = n_unreadable / (n_unreadable + n_kept) if n_unreadable + n_kept else 0.0
    if fraction > config.max_unreadable_fraction:
        first = "; ".join(f"{u['file']} ({u['reason']})" for u in report["unreadable"][:_FIRST_BAD_FILES_SHOWN])
        raise IngestError(
            f"{n_unreadable} of {n_unreadable + n_kept} images ({fraction:.1%}) are unreadable, more than "
            f"ingest.max_unreadable_fraction = {config.max_unreadable_fraction}. First bad files: {first}. "
            "Fix or remove them, or raise ingest.max_unreadable_fraction to accept the loss")


# ---------------------------------------------------------------------------------------- manifest

def write_manifest(rows: list[ManifestRow], path: Path | str) -> None:
    """Write the manifest CSV (UTF-8, `\\n` line ends) to exactly `path`; text cells spreadsheet-safe (csvcells),
    which read_manifest undoes."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        for row in rows:
            writer.writerow([_manifest_cell(getattr(row, column)) for column in MANIFEST_COLUMNS])


def _manifest_cell(value: Any) -> Any:
    return spreadsheet_safe(value) if isinstance(value, str) else value


def read_manifest(path: Path | str) -> list[ManifestRow]:
    """Read a manifest written by write_manifest (one without a site column: every image at SINGLE_SITE);
    a wrong header or row names the file and line."""
    path = Path(path)
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        columns = tuple(header) if header is not None else ()
        if columns not in (MANIFEST_COLUMNS, _MANIFEST_COLUMNS_WITHOUT_SITE):
            raise IngestError(f"{path}: header is {header!r}, expected {','.join(MANIFEST_COLUMNS)!r}; "
                              "regenerate it with the ingest stage (dvc repro)")
        return [_manifest_row(path, reader.line_num, columns, cells) for cells in reader]


def _manifest_row(path: Path, line: int, columns: tuple[str, ...], cells: list[str]) -> ManifestRow:
    if len(cells) != len(columns):
        raise IngestError(f"{path} line {line}: {len(cells)} columns, expected {len(columns)}; "
                          "regenerate it with the ingest stage (dvc repro)")
    values: dict[str, Any] = dict(zip(columns, map(original_cell, cells), strict=True))
    try:
        for column in ("label", "width", "height", "channels"):
            values[column] = int(values[column])
    except ValueError:
        raise IngestError(f"{path} line {line}: {column} = {values[column]!r} is not an integer; "
                          "regenerate it with the ingest stage (dvc repro)") from None
    if values["label"] not in VALID_LABELS:
        raise IngestError(f"{path} line {line}: label {values['label']} is not 0 or 1; "
                          "regenerate it with the ingest stage (dvc repro)")
    return ManifestRow(**values)
