"""Deterministic generator of SYNTHETIC PAS-stained glomerulus crops in the CMIL dataset layout.

The images only mimic the look of the real data (class folders, ``public.csv``, RGBA PNGs of
variable size, biopsy-grouped file names) so the pipeline can be demonstrated and tested without
the real dataset. They carry no medical information. Every biopsy id starts with ``SYNTH-``, every
PNG holds a ``Comment`` text chunk saying ``synthetic glomeruli sample`` and the folder holds
``SYNTHETIC_DATA.txt``, so synthetic files cannot pass for real ones.

Drawing model: two stain-density maps (hematoxylin for nuclei, PAS for basement membranes and
matrix) are painted with vectorised NumPy/OpenCV operations and turned into colour with the
Beer-Lambert law, which makes per-biopsy stain variation a matter of jittering two colour vectors.

Several sites (``n_sites``, ``glomeruli sample-data --sites N``), for stain robustness and leave-one-site-out
work: the images are split evenly over the sites and each biopsy belongs to one (at least three per site). Each site
draws its own stain vectors, stain intensity, scanner blur, glass white balance and surrounding-tissue density
(_SiteLook); its biopsies vary around that at half the one-site spread, so sites differ far more than the biopsies
of one site. Each site also has its own share of sclerotic glomeruli, so site and label are correlated as in real
cohorts. The rule: site k of N (k = 0 for SITE1) sits at logit(p_k) = c + 1.4 * (2k / (N - 1) - 1), evenly
spaced on the log-odds scale with SITE1 lowest, and c is set so that the expected counts add up to the requested
overall fraction (18 % over three equal sites: about 3.5 %, 13 % and 38 %); every site keeps at least two of each
class. The class is still decided by the glomerulus' structure alone: its features come from the image's own
random stream, whatever its site. The site is part of the biopsy id in each file name,
``SYNTH-SITE2_B005_PAS_1of7_<hex>.png``; layout.SYNTHETIC_SITE_REGEX (``^SYNTH-(?P<site>SITE\\d+)_``) reads it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import shutil
import struct
import sys
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import cv2
import numpy as np

from glomeruli import __version__
from glomeruli.core.errors import UserError
from glomeruli.data.layout import (BIOPSY_PREFIX, LABELS_CSV, MARKER_FILE, NON_SCLEROTIC_DIR, SCLEROTIC_DIR,
                              SYNTHETIC_SITE_REGEX)

__all__ = ["SampleSummary", "SitesError", "generate_sample_dataset"]

log = logging.getLogger(__name__)

CSV_HEADER = "name,ground truth"
# First line of the marker file: proves a folder is ours to replace.
MARKER_SIGNATURE = "SYNTHETIC glomeruli sample data"
PNG_TEXT_KEY = "Comment"
PNG_TEXT_PREFIX = "synthetic glomeruli sample"
NAME_HEX_BYTES = 12  # 24 lowercase hex digits, like the real file names

MIN_IMAGES = 4  # two of each class
MIN_SIDE = 16
MIN_PER_CLASS = 2
IMAGES_PER_BIOPSY = 12  # default biopsy count is n_images / this
EMPTY_BIOPSY_PROBABILITY = 0.3  # biopsies drawn without any sclerotic glomerulus

# Independent random streams (SeedSequence spawn keys) so that the plan, each biopsy's stain and
# each image are reproducible on their own, whichever worker draws them.
_PLAN_STREAM, _IMAGE_STREAM, _BIOPSY_STREAM, _SITE_STREAM = 0, 1, 2, 3

# Several sites (`n_sites` > 1): each hospital has its own stain protocol and scanner, and its own share of
# sclerotic glomeruli. File names carry the site inside the biopsy id, after BIOPSY_PREFIX (so ingest's synthetic
# checks still hold): SYNTH-SITE2_B005_PAS_1of7_<hex>.png. SYNTHETIC_SITE_REGEX (layout.py) reads it (the recommended
# ingest.site_regex).
SITE_PREFIX = "SITE"
MIN_BIOPSIES_PER_SITE = 3
# Site prevalences are evenly spaced on the log-odds scale, this far either side of their centre: the extreme
# sites' odds differ by e^2.8 = 16, as in a real three-hospital cohort (4 % vs 42 %); 18 % overall over 3 sites
# gives about 3.5 %, 13 % and 38 %.
SITE_LOGIT_HALF_SPREAD = 1.4
# Site-to-site appearance (one value per stratum of each range, in a seeded order, so no two sites coincide):
SITE_LOG_CONCENTRATION = (-0.55, 0.55)  # log stain amount of each stain (intensity): x0.58 to x1.73
SITE_HUE_SHIFT = 0.25  # relative spread of each stain vector's R, G, B absorbance (stain hue)
SITE_BLUR = (0.3, 1.5)  # scanner blur sigma, px (as _Stain.blur)
SITE_WHITE = 244.0  # mean grey level of empty glass...
SITE_LIGHTNESS = 3.0  # ...moved up to this much darker or brighter...
SITE_TINT = 10.0  # ...and tinted this much along a seeded direction of the warm-cool / green-magenta plane
SITE_TISSUE = (0.7, 1.35)  # PAS density of the surrounding interstitium and tubules, relative
# Biopsy-to-biopsy variation within a site, relative to that between the biopsies of a one-site sample.
WITHIN_SITE_VARIATION = 0.5

# Optical densities (absorbance per unit stain, R, G, B) from Ruifrok & Johnston's H-PAS vectors.
HEMATOXYLIN_OD_RGB = (0.644, 0.717, 0.267)
PAS_OD_RGB = (0.175, 0.972, 0.155)
LN10 = float(np.log(10.0))
NUCLEUS_DENSITY = 1.0  # hematoxylin density of a nucleus core
HEMA_MAX, PAS_MAX = 2.2, 1.6  # densities map onto 0..255 for the colour look-up tables

# Class features as (non-sclerotic, sclerotic) values; `difficulty` blends each toward the other
# class. Units: densities are stain amounts, widths/gaps are fractions of the capsule radius.
CLASS_FEATURES: dict[str, tuple[float, float]] = {
    "tuft_pas": (0.55, 0.25),  # dense magenta tuft vs pale matrix
    "tuft_hema": (0.11, 0.03),  # cellular (purple) vs acellular (pink-lilac)
    "tuft_grain": (0.40, 0.08),  # textured vs homogeneous
    "lumen_fraction": (0.16, 0.006),  # open capillary lumens
    "capillary_wall": (0.35, 0.0),  # PAS-bright capillary loops around lumens
    "wrinkled_gbm": (0.0, 0.14),  # collapsed, crinkled basement membranes inside the scar
    "nucleus_density": (1.0, 0.07),  # nuclei per (nucleus spacing)^2, relative
    "bowman_gap": (0.10, 0.0),  # white Bowman's space between tuft and capsule
    "bowman_fill": (0.0, 0.22),  # collagen filling Bowman's space (obsolescence)
    "lobulation": (0.06, 0.015),
    "wrinkle": (0.004, 0.025),  # fine crinkling of the outline
    "fibrous_width": (0.015, 0.20),  # concentric fibrous lamellae around the tuft
    "fibrous_pas": (0.55, 0.40),
    "size": (1.0, 0.88),  # sclerotic glomeruli tend to shrink
}
# Structure-only regime (`structure_only=True`): these features are drawn from one distribution for
# both classes (stain, density, nucleus count, size, outline, periglomerular fibrosis), so colour,
# brightness and nucleus count carry no label; only the tuft's structure does (STRUCTURE_FEATURES).
SHARED_FEATURES = ("tuft_pas", "tuft_hema", "tuft_grain", "nucleus_density", "lobulation", "wrinkle",
                   "fibrous_width", "fibrous_pas", "size")
# (non-sclerotic, sclerotic): round open lumens ringed by PAS-dark capillary loops and a white Bowman's
# space, vs a homogeneous scar crossed by wrinkled basement membranes and thin clefts, filling the capsule.
STRUCTURE_FEATURES: dict[str, tuple[float, float]] = {
    "capillary_wall": (0.35, 0.0),
    "wrinkled_gbm": (0.0, 0.30),
    "bowman_gap": (0.10, 0.0),
}
# Shares of white (lumens and Bowman's space / clefts) and PAS-dark (loops / wrinkles) pixels inside the
# capsule, one draw for both classes; the PAS densities there are mapped onto one reference by rank (_match_histogram),
# so the colour histogram is the same for both classes and only the arrangement of the pixels differs.
WHITE_FRACTION = (0.08, 0.20)
DARK_FRACTION = (0.08, 0.20)
STRUCTURE_LUMEN_SPACING = 0.12  # lumens, wrinkles and clefts large enough to survive a 64-96 px input
STRUCTURE_RIDGE_CELL = 0.24
STRUCTURE_CLEFT_CELL = 0.9
SHRUNKEN_PROBABILITY = 0.3  # sclerotic glomeruli drawn markedly small (obsolete, shrunken)
SHRUNKEN_SCALE = (0.55, 0.8)
FEATURE_JITTER = 0.12  # per-image relative spread of each feature
MAX_BLEND = 0.32  # feature blend toward the other class at difficulty 1 (typical images)
AMBIGUOUS_FRACTION = 0.22  # share of blended "obsolescent-like" images at difficulty 1
AMBIGUOUS_BLEND = (0.35, 0.6)

# Geometry, as fractions of the capsule radius R (real: glomerulus ~200 um, nucleus ~6 um).
NUCLEUS_RADIUS = 0.026
NUCLEUS_SPACING = 3.4  # in nucleus radii, for nucleus_density 1
LUMEN_SPACING = 0.06
TUBULE_SPACING = 0.62
CAPSULE_THICKNESS = 0.018
FILL_RANGE = (0.80, 0.97)  # glomerulus extent / crop extent (crops are loose bounding boxes)
MAX_ASPECT = 1.45  # glomeruli are cut obliquely at most this elongated
GLASS_PROBABILITY = 0.15  # crops that reach the edge of the tissue section
RENDER_STEP = 2  # draw at 1/RENDER_STEP of the crop size, then upsample
RENDER_STEP_MIN_SIDE = 200  # smaller crops are drawn at full size to keep their detail
THETA_BINS = 512  # angular resolution of the outline look-up tables
NOISE_STD = 0.86  # std of unit Gaussian noise after bicubic upsampling (measured)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt() parameter ids

# PNG encoding: OpenCV with the SUB filter and Huffman-only deflate, not Pillow's adaptive filters: encoding
# is a large share of making thousands of images, and the files are only slightly larger. The tEXt chunk is
# spliced in by hand (see _encode_png).
PNG_PARAMS = [
    cv2.IMWRITE_PNG_COMPRESSION, 1,
    cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY,
    cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB,
]  # fmt: skip


@dataclass(frozen=True)
class SampleSummary:
    """What :func:`generate_sample_dataset` wrote."""

    root: Path
    n_images: int
    n_sclerotic: int
    n_biopsies: int
    n_sites: int = 1


class SitesError(UserError, ValueError):
    """A number of sites the other sizes cannot hold (a ValueError too, like the other argument errors)."""


@dataclass(frozen=True)
class _Stain:
    """Per-biopsy scanner/stain appearance."""

    hema_od: tuple[float, float, float]  # B, G, R, already scaled by concentration and ln 10
    pas_od: tuple[float, float, float]
    white: tuple[float, float, float]  # B, G, R of empty glass
    blur: float  # scanner blur sigma in px, for glomeruli drawn with a radius >= 150 px
    tissue: float = 1.0  # PAS density of the surroundings (interstitium, tubules), relative


@dataclass(frozen=True)
class _SiteLook:
    """One site's stain protocol and scanner, around which its biopsies vary."""

    hema_rgb: tuple[float, float, float]  # stain vectors (absorbance, R, G, B), before normalisation
    pas_rgb: tuple[float, float, float]
    hema_amount: float  # stain intensity
    pas_amount: float
    white: tuple[float, float, float]  # B, G, R of empty glass
    blur: float
    tissue: float


@dataclass(frozen=True)
class _Job:
    index: int
    name: str
    label: int
    width: int
    height: int
    stain: _Stain
    difficulty: float
    seed: int
    structure_only: bool = False
    site: str = ""  # SITE<k> in a multi-site sample


# --------------------------------------------------------------------------------------------
# Public entry point


def generate_sample_dataset(
    out_dir: Path | str,
    n_images: int = 200,
    *,
    sclerotic_fraction: float = 0.18,
    difficulty: float = 0.3,
    seed: int = 0,
    size_range: tuple[int, int] = (250, 950),
    n_biopsies: int | None = None,
    workers: int = 1,
    progress: bool = True,
    structure_only: bool = False,
    n_sites: int = 1,
) -> SampleSummary:
    """Write a synthetic CMIL-layout dataset into ``out_dir`` and return a summary.

    Same arguments give byte-identical files whatever ``workers`` is (0 = all cores).
    ``difficulty`` 0 makes the classes trivially separable, 1 blends their features, strengthens
    stain/blur variation and adds ambiguous obsolescent-like glomeruli. ``structure_only`` draws
    stain, density, nucleus count and size from one distribution for both classes, so only the tuft's
    structure (open lumens and capillary loops vs a wrinkled scar and filled Bowman's space) tells
    them apart: the hard set on which a head over a random frozen base fails. ``n_sites`` > 1 spreads the
    biopsies over that many sites (hospitals), each with its own stain, scanner and share of sclerotic
    glomeruli, named ``SYNTH-SITE<k>_B<b>_PAS_...`` (see SYNTHETIC_SITE_REGEX); 1 writes exactly the one-site sample.
    Refuses (FileExistsError) a non-empty ``out_dir`` that is not a previous synthetic dataset; replaces one
    that is.
    """
    out = Path(out_dir).expanduser().resolve()  # "x/.." must still name a sibling for the temp
    _validate(n_images, sclerotic_fraction, difficulty, seed, size_range, n_biopsies, workers)
    _validate_sites(n_sites, n_images, n_biopsies)
    _check_target(out)
    jobs, n_bio = _plan(n_images, sclerotic_fraction, difficulty, seed, size_range, n_biopsies,
                        bool(structure_only), int(n_sites))
    n_scl = sum(j.label for j in jobs)

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)  # left over by a crashed run of a process with our pid
    try:
        for sub in (SCLEROTIC_DIR, NON_SCLEROTIC_DIR):
            (tmp / sub).mkdir(parents=True)
        log.info("Generating %d synthetic images (%d sclerotic, %d biopsies%s, difficulty %.2f%s) in %s", n_images,
                 n_scl, n_bio, f", {n_sites} sites" if n_sites > 1 else "", difficulty,
                 ", structure only" if structure_only else "", out)
        _run_jobs(jobs, tmp, workers, progress)
        _write_csv(tmp / LABELS_CSV, jobs)
        _write_marker(tmp / MARKER_FILE, n_images, n_scl, n_bio, sclerotic_fraction, difficulty,
                      seed, size_range, bool(structure_only), _site_lines(jobs, sclerotic_fraction, int(n_sites)))
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SampleSummary(root=out, n_images=n_images, n_sclerotic=n_scl, n_biopsies=n_bio, n_sites=int(n_sites))


# --------------------------------------------------------------------------------------------
# Validation, planning and file handling


def _validate(n_images, fraction, difficulty, seed, size_range, n_biopsies, workers) -> None:
    if not isinstance(n_images, (int, np.integer)) or n_images < MIN_IMAGES:
        raise ValueError(f"n_images must be an integer >= {MIN_IMAGES}, got {n_images!r}")
    if not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"sclerotic_fraction must be in (0, 1), got {fraction!r}")
    if not 0.0 <= float(difficulty) <= 1.0:
        raise ValueError(f"difficulty must be in [0, 1], got {difficulty!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    try:
        lo, hi = (int(v) for v in size_range)
    except (TypeError, ValueError):
        msg = f"size_range must be a (min, max) pair of ints, got {size_range!r}"
        raise ValueError(msg) from None
    if lo < MIN_SIDE or lo > hi:
        raise ValueError(f"size_range must satisfy {MIN_SIDE} <= min <= max, got {size_range!r}")
    if n_biopsies is not None and (not isinstance(n_biopsies, (int, np.integer))
                                   or not 1 <= n_biopsies <= n_images):
        raise ValueError(f"n_biopsies must be in [1, n_images], got {n_biopsies!r}")
    if not isinstance(workers, (int, np.integer)) or workers < 0:
        raise ValueError(f"workers must be an integer >= 0 (0 = all cores), got {workers!r}")


def _validate_sites(n_sites, n_images, n_biopsies) -> None:
    if not isinstance(n_sites, (int, np.integer)) or isinstance(n_sites, bool) or n_sites < 1:
        raise SitesError(f"--sites (n_sites) must be an integer >= 1, got {n_sites!r}")
    if n_sites == 1:
        return
    least = 2 * MIN_PER_CLASS * n_sites
    if n_images < least:
        raise SitesError(f"--sites {n_sites} needs at least {least} images ({MIN_PER_CLASS} of each class in every "
                         f"site), got --n-images {n_images}: lower --sites or raise --n-images")
    if n_biopsies is not None and n_biopsies < MIN_BIOPSIES_PER_SITE * n_sites:
        raise SitesError(f"--sites {n_sites} needs at least {MIN_BIOPSIES_PER_SITE * n_sites} biopsies "
                         f"({MIN_BIOPSIES_PER_SITE} per site), got n_biopsies {n_biopsies}: lower --sites or raise "
                         "n_biopsies")


def _is_synthetic_root(path: Path) -> bool:
    marker = path / MARKER_FILE
    try:
        with marker.open(encoding="utf-8") as fh:
            return fh.readline().strip() == MARKER_SIGNATURE
    except (OSError, UnicodeDecodeError):
        return False


def _check_target(out: Path) -> None:
    """Never let synthetic images mix with a user's real data."""
    if not out.exists():
        return
    cwd = Path.cwd()
    if cwd == out or out in cwd.parents:
        # The folder is replaced by a rename, which would leave this process in a deleted cwd.
        raise ValueError(f"out_dir must not be the current directory or contain it, got {out}")
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if not _is_synthetic_root(out):
        raise FileExistsError(
            f"{out} is not empty and holds no {MARKER_FILE} from a previous synthetic run; "
            "refusing to write synthetic images into what may be a real dataset. Choose an empty "
            "folder.")
    ours = {SCLEROTIC_DIR, NON_SCLEROTIC_DIR, LABELS_CSV, MARKER_FILE}
    foreign = [e for e in entries if e not in ours]
    if foreign:
        raise FileExistsError(
            f"{out} is a synthetic dataset but also holds {foreign[:5]}; refusing to delete them. "
            "Remove them or choose another folder.")


def _swap_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)  # only an empty folder or a previous synthetic dataset gets here
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def _plan(n_images, fraction, difficulty, seed, size_range, n_biopsies,
          structure_only: bool = False, n_sites: int = 1) -> tuple[list[_Job], int]:
    """Draw labels, biopsy grouping, sizes and names; cheap and done once in the main process."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_PLAN_STREAM,)))
    n = int(n_images)
    n_scl = _requested_sclerotic(n, fraction, n_sites)
    if n_sites == 1:
        n_bio = int(n_biopsies) if n_biopsies is not None else max(2, round(n / IMAGES_PER_BIOPSY))
        site_images, site_biopsies, site_scl = [n], [min(n_bio, n)], [n_scl]
    else:
        n_bio = (int(n_biopsies) if n_biopsies is not None
                 else max(MIN_BIOPSIES_PER_SITE * n_sites, round(n / IMAGES_PER_BIOPSY)))
        site_images = _even_shares(n, n_sites)
        site_biopsies = [min(b, m) for b, m in zip(_even_shares(n_bio, n_sites), site_images)]
        site_scl = _site_sclerotic_counts(site_images, n_scl)
    n_bio = sum(site_biopsies)

    sizes, labels = [], []
    for m, b, s in zip(site_images, site_biopsies, site_scl):
        site_sizes, site_labels = _biopsies_and_labels(rng, m, b, s)
        sizes.append(site_sizes)
        labels.append(site_labels)
    sizes, labels = np.concatenate(sizes), np.concatenate(labels)
    biopsy_of = np.repeat(np.arange(n_bio), sizes)
    site_of_biopsy = np.repeat(np.arange(n_sites), site_biopsies)

    lo, hi = (int(v) for v in size_range)
    # Skewed toward small crops, like the real data; width and height drawn independently.
    widths = lo + np.rint((hi - lo) * rng.beta(1.6, 2.4, size=n)).astype(int)
    heights = lo + np.rint((hi - lo) * rng.beta(1.6, 2.4, size=n)).astype(int)

    if n_sites == 1:
        stains = [_draw_stain(seed, b, difficulty) for b in range(n_bio)]
        site_ids = [""]
    else:
        looks = _draw_site_looks(seed, n_sites)
        stains = [_draw_site_stain(seed, b, difficulty, looks[site_of_biopsy[b]]) for b in range(n_bio)]
        site_ids = [f"{SITE_PREFIX}{k + 1}" for k in range(n_sites)]
    names: list[str] = []
    seen: set[str] = set()
    counter = np.zeros(n_bio, dtype=int)
    for i in range(n):
        b = biopsy_of[i]
        counter[b] += 1
        site_part = f"{site_ids[site_of_biopsy[b]]}_" if n_sites > 1 else ""
        name = ""
        while not name or name in seen:
            name = (f"{BIOPSY_PREFIX}{site_part}B{b + 1:03d}_PAS_{counter[b]}of{sizes[b]}_"
                    f"{rng.bytes(NAME_HEX_BYTES).hex()}.png")
        seen.add(name)
        names.append(name)

    jobs = [
        _Job(i, names[i], int(labels[i]), int(widths[i]), int(heights[i]), stains[biopsy_of[i]],
             float(difficulty), int(seed), structure_only, site_ids[site_of_biopsy[biopsy_of[i]]])
        for i in range(n)
    ]
    return jobs, n_bio


def _requested_sclerotic(n: int, fraction: float, n_sites: int) -> int:
    """round(n * fraction), leaving room for MIN_PER_CLASS of each class in every site."""
    return int(np.clip(round(n * fraction), MIN_PER_CLASS * n_sites, n - MIN_PER_CLASS * n_sites))


def _biopsies_and_labels(rng: np.random.Generator, n: int, n_bio: int, n_scl: int) -> tuple[np.ndarray, np.ndarray]:
    """Uneven biopsy sizes (each at least one glomerulus) and labels, sclerotic ones clustered in some biopsies."""
    weights = rng.gamma(1.5, size=n_bio)
    sizes = 1 + rng.multinomial(n - n_bio, weights / weights.sum())
    biopsy_of = np.repeat(np.arange(n_bio), sizes)
    propensity = rng.gamma(0.8, size=n_bio) + 1e-3
    empty = rng.random(n_bio) < EMPTY_BIOPSY_PROBABILITY
    for b in np.argsort(-sizes):  # give back the biggest biopsies until enough candidates remain
        if sizes[~empty].sum() >= n_scl and (~empty).any():
            break
        empty[b] = False
    p = np.where(empty, 0.0, propensity)[biopsy_of]
    labels = np.zeros(n, dtype=np.int64)
    labels[rng.choice(n, size=n_scl, replace=False, p=p / p.sum())] = 1
    return sizes, labels


def _even_shares(total: int, parts: int) -> list[int]:
    """`total` split into `parts` near-equal integers, the remainder to the first parts."""
    return [total // parts + (k < total % parts) for k in range(parts)]


def _site_prevalence_targets(site_images: list[int], n_sclerotic: int) -> np.ndarray:
    """Each site's expected share of sclerotic glomeruli (the rule in the module docstring).

    Site k of N sits at logit(p_k) = c + SITE_LOGIT_HALF_SPREAD * (2k / (N - 1) - 1): evenly spaced on the
    log-odds scale, the first site lowest, with c chosen so that the expected counts add up to `n_sclerotic`.
    """
    from scipy.optimize import brentq
    from scipy.special import expit

    sizes = np.asarray(site_images, dtype=float)
    offsets = SITE_LOGIT_HALF_SPREAD * np.linspace(-1.0, 1.0, len(sizes))
    centre = brentq(lambda c: float(sizes @ expit(c + offsets)) - n_sclerotic, -30.0, 30.0, xtol=1e-12)
    return expit(centre + offsets)


def _site_sclerotic_counts(site_images: list[int], n_sclerotic: int) -> list[int]:
    """Whole counts near the expected ones (largest remainders), at least MIN_PER_CLASS of each class per site."""
    expected = np.asarray(site_images) * _site_prevalence_targets(site_images, n_sclerotic)
    counts = np.floor(expected).astype(int)
    counts[np.argsort(-(expected - counts), kind="stable")[:n_sclerotic - counts.sum()]] += 1
    return [int(np.clip(c, MIN_PER_CLASS, m - MIN_PER_CLASS)) for c, m in zip(counts, site_images)]


def _draw_stain(seed: int, biopsy: int, difficulty: float) -> _Stain:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_BIOPSY_STREAM, biopsy)))
    amp = 0.4 + 1.2 * difficulty  # stain/scanner variation grows with difficulty

    def vector(base, conc_spread):
        v = np.asarray(base[::-1]) * (1.0 + 0.10 * amp * rng.standard_normal(3))  # hue shift
        v = np.clip(v, 0.03, None) / np.linalg.norm(v)
        conc = np.exp(conc_spread * amp * rng.standard_normal())
        return tuple(float(x) for x in v * conc * LN10)

    white = 246.0 - 6.0 * amp * rng.random(3)  # scanner white balance, B G R
    return _Stain(hema_od=vector(HEMATOXYLIN_OD_RGB, 0.18), pas_od=vector(PAS_OD_RGB, 0.15),
                  white=tuple(float(x) for x in white),
                  blur=float(0.35 + amp * 0.6 * rng.random()))


def _draw_site_looks(seed: int, n_sites: int) -> list[_SiteLook]:
    """Each site's stain and scanner, from its own stream: independent of image and biopsy draws."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_SITE_STREAM,)))

    def spread(lo: float, hi: float) -> np.ndarray:  # one value per stratum of [lo, hi], in a seeded order
        return lo + (hi - lo) * (rng.permutation(n_sites) + rng.uniform(0.2, 0.8, n_sites)) / n_sites

    hema_amount, pas_amount = np.exp(spread(*SITE_LOG_CONCENTRATION)), np.exp(spread(*SITE_LOG_CONCENTRATION))
    blur, tissue = spread(*SITE_BLUR), spread(*SITE_TISSUE)
    lightness, tint_angle = spread(-SITE_LIGHTNESS, SITE_LIGHTNESS), spread(0.0, 2 * np.pi)
    warm, green = np.array([-1.0, 0.0, 1.0]) / np.sqrt(2), np.array([-1.0, 2.0, -1.0]) / np.sqrt(6)  # in B, G, R
    looks = []
    for k in range(n_sites):
        hue = 1.0 + SITE_HUE_SHIFT * rng.standard_normal((2, 3))
        tint = SITE_TINT * (np.cos(tint_angle[k]) * warm + np.sin(tint_angle[k]) * green)
        white = np.clip(SITE_WHITE + lightness[k] + tint, 0.0, 255.0)
        looks.append(_SiteLook(
            hema_rgb=tuple(float(x) for x in np.clip(np.asarray(HEMATOXYLIN_OD_RGB) * hue[0], 0.03, None)),
            pas_rgb=tuple(float(x) for x in np.clip(np.asarray(PAS_OD_RGB) * hue[1], 0.03, None)),
            hema_amount=float(hema_amount[k]), pas_amount=float(pas_amount[k]),
            white=tuple(float(x) for x in white), blur=float(blur[k]), tissue=float(tissue[k])))
    return looks


def _draw_site_stain(seed: int, biopsy: int, difficulty: float, site: _SiteLook) -> _Stain:
    """One biopsy's stain in a multi-site sample: its site's look, jittered as _draw_stain jitters, but less."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_BIOPSY_STREAM, biopsy)))
    amp = WITHIN_SITE_VARIATION * (0.4 + 1.2 * difficulty)

    def vector(base, amount, conc_spread):
        v = np.asarray(base[::-1]) * (1.0 + 0.10 * amp * rng.standard_normal(3))  # hue shift
        v = np.clip(v, 0.03, None) / np.linalg.norm(v)
        conc = amount * np.exp(conc_spread * amp * rng.standard_normal())
        return tuple(float(x) for x in v * conc * LN10)

    white = np.clip(np.asarray(site.white) + 6.0 * amp * (rng.random(3) - 0.5), 0.0, 255.0)
    return _Stain(hema_od=vector(site.hema_rgb, site.hema_amount, 0.18),
                  pas_od=vector(site.pas_rgb, site.pas_amount, 0.15),
                  white=tuple(float(x) for x in white),
                  blur=float(site.blur * (1.0 + 0.3 * amp * rng.uniform(-1.0, 1.0))),
                  tissue=float(site.tissue * np.exp(0.1 * amp * rng.standard_normal())))


def _write_csv(path: Path, jobs: list[_Job]) -> None:
    rows = sorted((j.name, j.label) for j in jobs)
    text = CSV_HEADER + "\n" + "".join(f"{name},{label}\n" for name, label in rows)
    path.write_text(text, encoding="utf-8", newline="")


def _site_lines(jobs: list[_Job], fraction: float, n_sites: int) -> list[str]:
    """The marker's account of the sites: how to read them from names, the prevalence rule, each site's counts."""
    if n_sites == 1:
        return []
    site_ids = list(dict.fromkeys(j.site for j in jobs))  # SITE1.. in plan order
    images = {s: [j for j in jobs if j.site == s] for s in site_ids}
    targets = _site_prevalence_targets([len(images[s]) for s in site_ids],
                                       _requested_sclerotic(len(jobs), fraction, n_sites))
    lines = [
        f"n_sites: {n_sites}",
        f"site_regex: {SYNTHETIC_SITE_REGEX} (the site in every file name; the biopsy id, before _PAS_, includes it)",
        f"site prevalence rule: sites evenly spaced on the log-odds scale, {SITE_LOGIT_HALF_SPREAD} logits either "
        f"side of a centre set by the overall count, {site_ids[0]} lowest; at least {MIN_PER_CLASS} of each class "
        "per site",
        "site and label are correlated on purpose (as in real cohorts): a model can score well by recognising a "
        "site's stain",
    ]
    for site, target in zip(site_ids, targets):
        rows = images[site]
        n_scl = sum(j.label for j in rows)
        lines.append(f"site {site}: n_images {len(rows)}, n_biopsies {len({j.name.split('_PAS_')[0] for j in rows})}, "
                     f"n_sclerotic {n_scl}, prevalence {n_scl / len(rows):.3f} (rule {target:.3f})")
    return lines


def _write_marker(path: Path, n_images, n_scl, n_bio, fraction, difficulty, seed, size_range,
                  structure_only: bool = False, site_lines: Iterable[str] = ()):
    lines = [
        MARKER_SIGNATURE,
        "",
        "Every image in this folder is SYNTHETIC: drawn by a program, not scanned from tissue.",
        "It imitates the CMIL glomeruli layout so the pipeline can be demonstrated and tested;",
        "it must never be used to train or evaluate a model meant for real biopsies.",
        "",
        f"generator: glomeruli.data.sample_data.generate_sample_dataset (glomeruli {__version__})",
        f"seed: {seed}",
        f"n_images: {n_images}",
        f"n_sclerotic: {n_scl}",
        f"n_biopsies: {n_bio}",
        f"sclerotic_fraction: {float(fraction)}",
        f"difficulty: {float(difficulty)}",
        f"size_range: [{int(size_range[0])}, {int(size_range[1])}]",
        *(["structure_only: true (colour, brightness and nucleus count do not separate the classes)"]
          if structure_only else []),
        *site_lines,
        f"biopsy ids start with {BIOPSY_PREFIX!r}; every PNG has a {PNG_TEXT_KEY!r} text chunk "
        f"starting with {PNG_TEXT_PREFIX!r}.",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", newline="")


# --------------------------------------------------------------------------------------------
# Running the jobs


def _run_jobs(jobs: list[_Job], folder: Path, workers: int, progress: bool) -> None:
    n_workers = min((os.cpu_count() or 1) if workers == 0 else workers, len(jobs))
    use_bar = progress and sys.stderr.isatty()
    done = _iter_done(jobs, folder, n_workers)
    if use_bar:
        from tqdm import tqdm

        with tqdm(total=len(jobs), desc="synthetic glomeruli", unit="img") as bar:
            for finished in done:
                bar.update(finished)
        return
    step = max(1, -(-len(jobs) // 10))  # ~10 log lines
    count = 0
    for finished in done:
        before, count = count, count + finished
        if progress and (count // step > before // step or count == len(jobs)):
            log.info("synthetic images: %d/%d", count, len(jobs))


def _iter_done(jobs: list[_Job], folder: Path, n_workers: int) -> Iterator[int]:
    """Draw and write every job; yields the number of images finished by each step."""
    if n_workers <= 1:
        for job in jobs:
            _write_one(job, folder)
            yield 1
        return
    # spawn, not fork: the caller may hold TensorFlow/OpenCV threads that fork would break. A
    # worker that dies (e.g. an unguarded __main__ re-imported by spawn) raises
    # BrokenProcessPool here instead of hanging the way multiprocessing.Pool does.
    size = max(1, min(16, len(jobs) // (n_workers * 8)))
    chunks = [jobs[i:i + size] for i in range(0, len(jobs), size)]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(n_workers, mp_context=ctx, initializer=_init_worker) as pool:
        futures = [pool.submit(_write_chunk, chunk, folder) for chunk in chunks]
        try:
            for fut in as_completed(futures):
                yield fut.result()
        except BrokenProcessPool as exc:
            raise BrokenProcessPool(
                "a sample-data worker died. If you called generate_sample_dataset(workers != 1) "
                "from a script, put the call under `if __name__ == '__main__':` (spawned workers "
                "re-import the main module), or use workers=1.") from exc
        finally:
            for fut in futures:
                fut.cancel()


def _write_chunk(jobs: list[_Job], folder: Path) -> int:
    for job in jobs:
        _write_one(job, folder)
    return len(jobs)


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core already; nested threads only contend
    # Drawing churns through many short-lived arrays of a few hundred KiB; glibc serves those
    # with fresh mmaps by default and page faults then cost ~40 % of the time. The worker is
    # our own process, so raising the thresholds there affects nobody else.
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 64 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 << 20)
    except (OSError, AttributeError):
        pass  # not glibc: only slower


def _write_one(job: _Job, folder: Path) -> None:
    data = _encode_png(_render(job), _png_comment(job))
    sub = SCLEROTIC_DIR if job.label == 1 else NON_SCLEROTIC_DIR
    (folder / sub / job.name).write_bytes(data)


def _png_comment(job: _Job) -> str:
    # No label in the metadata: a loader must not be able to read the answer from the file.
    return (f"{PNG_TEXT_PREFIX}; NOT real tissue; generator glomeruli.data.sample_data {__version__}; "
            f"seed {job.seed}; index {job.index}; difficulty {job.difficulty:g}"
            + ("; structure only" if job.structure_only else ""))


def _encode_png(bgra: np.ndarray, comment: str) -> bytes:
    """Encode with OpenCV and splice a tEXt chunk after IHDR (no timestamps: bytes are stable)."""
    ok, buf = cv2.imencode(".png", bgra, PNG_PARAMS)
    if not ok:
        raise RuntimeError("OpenCV failed to encode a PNG")
    png = buf.tobytes()
    payload = PNG_TEXT_KEY.encode("latin-1") + b"\0" + comment.encode("latin-1")
    chunk = (struct.pack(">I", len(payload)) + b"tEXt" + payload
             + struct.pack(">I", zlib.crc32(b"tEXt" + payload) & 0xFFFFFFFF))
    ihdr_end = 8 + 4 + 4 + 13 + 4  # signature, IHDR length, type, data, CRC
    return png[:ihdr_end] + chunk + png[ihdr_end:]


# --------------------------------------------------------------------------------------------
# Drawing


def _features(label: int, difficulty: float, rng: np.random.Generator) -> dict[str, float]:
    """Class features of one glomerulus, blended toward the other class as difficulty grows."""
    if rng.random() < AMBIGUOUS_FRACTION * difficulty:
        base_blend = rng.uniform(*AMBIGUOUS_BLEND)
    else:
        base_blend = MAX_BLEND * difficulty * rng.random()
    feats = {}
    for key, (v0, v1) in CLASS_FEATURES.items():
        own, other = (v1, v0) if label else (v0, v1)
        blend = float(np.clip(base_blend * rng.uniform(0.5, 1.5), 0.0, 1.0))  # features drift apart
        value = own + blend * (other - own)
        feats[key] = max(0.0, value * (1.0 + FEATURE_JITTER * rng.uniform(-1, 1)))
    if label and rng.random() < SHRUNKEN_PROBABILITY * (1.0 - 0.5 * difficulty):
        feats["size"] *= rng.uniform(*SHRUNKEN_SCALE)
    return feats


def _structure_features(label: int, difficulty: float, rng: np.random.Generator) -> dict[str, float]:
    """Structure-only regime: SHARED_FEATURES independent of the label, STRUCTURE_FEATURES by class
    (blended toward the other class as difficulty grows, like _features)."""
    feats = {key: float(rng.uniform(*sorted(CLASS_FEATURES[key]))) for key in SHARED_FEATURES}
    feats.update(lumen_fraction=0.0, bowman_fill=0.0, white_fraction=float(rng.uniform(*WHITE_FRACTION)),
                 dark_fraction=float(rng.uniform(*DARK_FRACTION)))
    base_blend = MAX_BLEND * difficulty * rng.random()
    for key, (v0, v1) in sorted(STRUCTURE_FEATURES.items()):
        own, other = (v1, v0) if label else (v0, v1)
        blend = float(np.clip(base_blend * rng.uniform(0.5, 1.5), 0.0, 1.0))
        feats[key] = max(0.0, (own + blend * (other - own)) * (1.0 + FEATURE_JITTER * rng.uniform(-1, 1)))
    if feats["capillary_wall"] > feats["wrinkled_gbm"]:  # open lumens; their white joins the Bowman's space's
        feats["lumen_fraction"] = feats["white_fraction"]
    else:
        feats["clefts"] = feats["white_fraction"]
    return feats


def _crescent(theta: np.ndarray, phase: float) -> np.ndarray:
    """Bowman's space is widest on one side: its width profile around the tuft, 0.3..1."""
    return 0.3 + 0.7 * np.maximum(0.0, np.cos(theta - phase)) ** 2


def _gap_share(gap: float) -> float:
    """Share of the capsule's area that a Bowman's space `gap` wide (capsule radii) leaves white."""
    theta = np.linspace(-np.pi, np.pi, THETA_BINS, endpoint=False)
    return float(1.0 - np.mean((1.0 - gap * _crescent(theta, 0.0)) ** 2))


def _match_histogram(pas: np.ndarray, f: dict[str, float], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Map PAS densities (inside the capsule) by rank onto a reference drawn from shared features only.

    The lowest `white_fraction` becomes white (lumens and Bowman's space, or clefts), the highest
    `dark_fraction` PAS-dark membrane, the rest matrix: both classes then have the same density histogram
    (for the same draws) and differ only in where those densities lie. Returns (densities, white mask).
    """
    n = pas.size
    k_white, k_dark = int(round(f["white_fraction"] * n)), int(round(f["dark_fraction"] * n))
    k_mid = n - k_white - k_dark
    reference = np.concatenate([
        0.03 + 0.02 * rng.random(k_white),
        f["tuft_pas"] * np.clip(1.0 + 0.35 * f["tuft_grain"] * rng.standard_normal(k_mid) * 2.0, 0.3, None),
        f["tuft_pas"] + 0.35 * (0.6 + 0.4 * rng.random(k_dark)),
    ]).astype(np.float32)
    order = np.argsort(pas, kind="stable")
    out = np.empty(n, np.float32)
    out[order] = np.sort(reference)
    white = np.zeros(n, np.float32)
    white[order[:k_white]] = 1.0
    return out, white


def _periodic(rng: np.random.Generator, harmonics: Iterable[int], amp: float) -> np.ndarray:
    """Random smooth periodic function of the angle, sampled on THETA_BINS points."""
    theta = np.linspace(-np.pi, np.pi, THETA_BINS, endpoint=False)
    out = np.zeros(THETA_BINS)
    for k in harmonics:
        out += rng.normal(0.0, 1.0) / np.sqrt(k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return (amp * out / max(np.abs(out).max(), 1e-9)).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Gaussian noise with features ~cell px wide (low-res draw + bicubic upsampling)."""
    gh, gw = max(2, int(h / cell) + 2), max(2, int(w / cell) + 2)
    small = rng.standard_normal((gh, gw), dtype=np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _soft(x: np.ndarray, scale: float) -> np.ndarray:
    """Anti-aliased step: 0 for x << 0, 1 for x >> 0, ramp one pixel wide (scale = px per unit)."""
    return np.clip(x * scale + 0.5, 0.0, 1.0)


def _polar_maps(h, w, cx, cy, ax, ay, radii: list[np.ndarray], angular: np.ndarray):
    """rho / r(theta) for each outline LUT, and angular(theta), as full-size float32 maps.

    Computed on a coarse grid and bilinearly upsampled: these maps are smooth, and full-size
    arctan2 costs more than all the rest of the drawing together.
    """
    step = 4 if min(h, w) >= 128 else 1
    hs, ws = -(-h // step), -(-w // step)
    # Sample where cv2.resize's pixel-centre convention puts the coarse pixels, so that
    # upsampling interpolates exactly between true values.
    ys = ((np.arange(hs) + 0.5) * (h / hs) - 0.5 - cy) / ay
    xs = ((np.arange(ws) + 0.5) * (w / ws) - 0.5 - cx) / ax
    yy, xx = ys[:, None], xs[None, :]
    rho = np.hypot(xx, yy)
    t = ((np.arctan2(yy, xx) + np.pi) * (THETA_BINS / (2 * np.pi))).astype(np.intp) % THETA_BINS
    coarse = [(rho / r[t]).astype(np.float32) for r in radii] + [angular[t].astype(np.float32)]
    if step == 1:
        return coarse
    return [cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR) for m in coarse]


_COS_BINS = 1024
_COS_LUT = np.cos(np.arange(_COS_BINS) * (2 * np.pi / _COS_BINS)).astype(np.float32)


def _fast_cos(phase: np.ndarray) -> np.ndarray:
    """cos via a table: numpy's cos is unvectorised on some builds (~10x slower)."""
    idx = (phase * (_COS_BINS / (2 * np.pi))).astype(np.int32)
    idx &= _COS_BINS - 1  # two's complement makes this a true modulo for negatives too
    return _COS_LUT[idx]


def _render(job: _Job) -> np.ndarray:
    """Draw one crop as an (h, w, 4) uint8 BGRA array."""
    seq = np.random.SeedSequence(job.seed, spawn_key=(_IMAGE_STREAM, job.index))
    rng = np.random.default_rng(seq)
    d = job.difficulty
    f = (_structure_features if job.structure_only else _features)(job.label, d, rng)
    # Draw at reduced resolution and upsample: real 20x scans are soft at the pixel level anyway,
    # and this makes drawing ~4x cheaper (and the PNGs faster to encode).
    step = RENDER_STEP if min(job.width, job.height) >= RENDER_STEP_MIN_SIDE else 1
    h, w = -(-job.height // step), -(-job.width // step)

    # Geometry: an ellipse fitted to the crop (a loose bounding box), capped in elongation. A
    # shrunken glomerulus keeps the tissue scale (nuclei, tubules) of a normal one.
    fib_out = 0.55 * f["fibrous_width"]
    fib_in = 0.45 * f["fibrous_width"]
    extent = 1.0 + fib_out + CAPSULE_THICKNESS  # outer edge, in capsule radii
    fill = rng.uniform(*FILL_RANGE)
    ax, ay = fill * w / 2.0, fill * h / 2.0
    ax, ay = min(ax, MAX_ASPECT * ay) / extent, min(ay, MAX_ASPECT * ax) / extent
    scale = float(np.sqrt(ax * ay))  # px per capsule radius of a normal-size glomerulus
    size = min(f["size"], 1.0)
    ax, ay = ax * size, ay * size
    radius = float(np.sqrt(ax * ay))  # px per normalised radial unit: sets one-pixel edges
    cx = w / 2.0 + rng.uniform(-1, 1) * max(0.0, w / 2.0 - ax * extent) * 0.6
    cy = h / 2.0 + rng.uniform(-1, 1) * max(0.0, h / 2.0 - ay * extent) * 0.6

    # Outlines: near-round capsule, lobulated tuft shrunk by a crescent-shaped Bowman's space.
    theta = np.linspace(-np.pi, np.pi, THETA_BINS, endpoint=False, dtype=np.float32)
    r_caps = 1.0 + _periodic(rng, range(2, 5), 0.035) + _periodic(rng, range(14, 30), f["wrinkle"])
    crescent = _crescent(theta, rng.uniform(-np.pi, np.pi))
    lobes = _periodic(rng, range(4, 9), f["lobulation"])
    lobes = lobes + _periodic(rng, range(18, 40), f["wrinkle"])
    r_tuft = r_caps * (1.0 - f["bowman_gap"] * crescent) * (1.0 + lobes)
    r_tuft = np.minimum(r_tuft, r_caps)
    wobble = _periodic(rng, range(6, 24), 2.5)  # angular irregularity of the fibrous lamellae
    # c: 1 on the capsule; q: 1 on the tuft outline; both in capsule-normalised radial units.
    c, q, wob = _polar_maps(h, w, cx, cy, ax, ay, [r_caps, r_tuft], wobble)

    grain = rng.random((h, w), dtype=np.float32) - 0.5  # pixel-scale stain granularity
    low = _smooth_noise(rng, h, w, 0.45 * scale)  # slow density changes

    glom_mask = (cx, cy, ax, ay, r_caps, extent + 0.03)
    pas_bg, hema_bg, seeds = _draw_background(rng, h, w, scale, grain, low, glom_mask)
    if job.stain.tissue != 1.0:  # a site's interstitium and tubules take up more or less PAS
        pas_bg *= np.float32(job.stain.tissue)

    # Tuft: capillary lumens are the top tail of a smooth noise field, with PAS-bright rims.
    lumen_spacing = STRUCTURE_LUMEN_SPACING if job.structure_only else LUMEN_SPACING
    lum_noise = _smooth_noise(rng, h, w, lumen_spacing * scale)
    thresh = NOISE_STD * NormalDist().inv_cdf(1.0 - min(max(f["lumen_fraction"], 1e-4), 0.5))
    lumen = _soft(lum_noise - thresh, 4.0)
    wall = np.clip(1.0 - np.abs(lum_noise - thresh + 0.25) * 3.0, 0.0, 1.0)
    pas_tuft = f["tuft_pas"] * (1.0 + 1.2 * f["tuft_grain"] * grain + 0.15 * low)
    pas_tuft += f["capillary_wall"] * wall
    if f["wrinkled_gbm"] > 0.01:  # collapsed capillary walls: thin meandering level-set lines
        cell = (STRUCTURE_RIDGE_CELL if job.structure_only else 0.12) * scale
        ridge = np.clip(1.0 - np.abs(_smooth_noise(rng, h, w, cell)) * (cell / 2.5), 0.0, 1.0)
        pas_tuft += f["wrinkled_gbm"] * ridge
    if f.get("clefts", 0.0) > 0.005:  # thin white slits between collapsed loops (same white as open lumens)
        cleft_noise = _smooth_noise(rng, h, w, STRUCTURE_CLEFT_CELL * scale)
        width = NOISE_STD * NormalDist().inv_cdf(0.5 + 0.5 * min(f["clefts"], 0.9))
        lumen = np.maximum(lumen, _soft(width - np.abs(cleft_noise), 4.0))
    pas_tuft += lumen * (0.03 - pas_tuft)
    hema_tuft = f["tuft_hema"] * (1.0 + 1.5 * f["tuft_grain"] * grain + 0.3 * low) * (1.0 - lumen)

    # Bowman's space: white, or pale collagen in obsolescent glomeruli.
    pas_g = 0.03 + f["bowman_fill"] * (1.0 + 0.25 * low + 0.5 * grain)
    a_tuft = _soft(1.0 - q, radius)
    pas_g = pas_g + a_tuft * (pas_tuft - pas_g)
    hema_g = a_tuft * hema_tuft

    # Concentric, wrinkled fibrous lamellae wrap the (sclerotic) tuft.
    lamellae_hema = 1.0
    if f["fibrous_width"] > 0.03:
        n_layers = 1.5 + 12.0 * f["fibrous_width"]
        crinkle = _smooth_noise(rng, h, w, 0.12 * scale)
        freq = 2 * np.pi * n_layers / (fib_in + fib_out)
        phase = (c - 1.0 + fib_in) * freq + wob + 2.0 * crinkle
        layers = f["fibrous_pas"] * (0.62 + 0.38 * _fast_cos(phase)) * (1.0 + 0.5 * grain)
        zone = _soft(c - (1.0 - fib_in), radius) * _soft(1.0 + fib_out - c, radius)
        pas_g += (0.9 * zone) * (layers - pas_g)
        lamellae_hema = 1.0 - 0.7 * zone
        hema_g *= lamellae_hema
    if job.structure_only:  # same density histogram inside the capsule for both classes (see STRUCTURE_FEATURES)
        inside = c < 1.0
        pas_g[inside], white = _match_histogram(pas_g[inside], f, rng)
        # Hematoxylin by rank too: matrix everywhere but in the white (a raw gap that ranks as matrix gets it).
        matrix = f["tuft_hema"] * (1.0 + 1.5 * f["tuft_grain"] * grain + 0.3 * low) * lamellae_hema
        hema_g[inside] = matrix[inside] * (1.0 - white)
        lumen = np.zeros_like(lumen)
        lumen[inside] = white
        a_tuft = np.maximum(a_tuft, inside.astype(np.float32))  # nuclei suppression below covers the capsule
    # Capsule basement membrane: a thin PAS-dark line just outside c = 1.
    cap = _soft(CAPSULE_THICKNESS / 2 - np.abs(c - 1.0 - CAPSULE_THICKNESS / 2), radius)
    pas_g = np.maximum(pas_g, 0.7 * cap)

    a_glom = _soft(extent - c, radius)
    pas = pas_bg + a_glom * (pas_g - pas_bg)
    hema = hema_bg + a_glom * (hema_g - hema_bg)

    # Glomerular nuclei inside the tuft (and a few fibroblasts among the lamellae).
    r_nuc = max(0.8, NUCLEUS_RADIUS * scale)
    n_try = int(f["nucleus_density"] * 4.0 * ax * ay / (NUCLEUS_SPACING * r_nuc) ** 2)
    if job.structure_only:  # as many nuclei as a tuft within an open Bowman's space holds
        n_try = int(n_try * (1.0 - _gap_share(STRUCTURE_FEATURES["bowman_gap"][0])) / (1.0 - _gap_share(f["bowman_gap"])))
    gx = np.rint(cx + rng.uniform(-1, 1, n_try) * ax).clip(0, w - 1).astype(np.intp)
    gy = np.rint(cy + rng.uniform(-1, 1, n_try) * ay).clip(0, h - 1).astype(np.intp)
    keep = q[gy, gx] < 0.97
    if f["fibrous_width"] > 0.03:
        cg = c[gy, gx]
        keep |= (cg > 1.0 - fib_in) & (cg < 1.0 + fib_out) & (rng.random(n_try) < 0.1)
    seeds[gy[keep], gx[keep]] = rng.integers(150, 256, size=int(keep.sum()), dtype=np.uint8)
    hema += _nuclei(seeds, r_nuc, rng) * (1.0 + 0.5 * grain - 0.7 * (lumen * a_tuft))

    bgr = _colourise(pas, hema, job.stain, scale, d, rng)
    if step > 1:
        bgr = cv2.resize(bgr, (job.width, job.height), interpolation=cv2.INTER_CUBIC)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA)  # alpha 255 everywhere, like the real crops


def _nuclei(seeds: np.ndarray, r_nuc: float, rng: np.random.Generator) -> np.ndarray:
    """Grow seed pixels into soft round-to-oval nuclei; a seed's value sets its size and darkness.

    A Gaussian blur of the impulses, amplified and clipped, gives flat-topped discs with soft
    edges at any size (dilation with a tiny elliptical kernel gives crosses).
    """
    sx = 0.6 * r_nuc * rng.uniform(0.8, 1.2)  # visible radius ~1.6 sigma
    sy = 0.6 * r_nuc * rng.uniform(0.8, 1.2)
    blob = cv2.GaussianBlur(seeds.astype(np.float32), (0, 0), sx, sigmaY=sy)
    blob *= 2 * np.pi * sx * sy * 1.8 / 255.0  # a full seed reaches 1.8 at the centre
    np.minimum(blob, 1.0, out=blob)
    return blob * NUCLEUS_DENSITY


def _draw_background(rng, h, w, scale, grain, low, glom):
    """Interstitium and tubules around the glomerulus: PAS, hematoxylin, nucleus seed maps."""
    cx, cy, ax, ay, r_caps, reach = glom
    canvas = np.full((h, w), 0.12, dtype=np.float32)

    # Tubules on a jittered grid, packed so neighbours share walls; painter's order overlaps them.
    step = TUBULE_SPACING * scale
    gy, gx = np.mgrid[-0.5:h / step + 0.5, -0.5:w / step + 0.5]
    n = gx.size
    centres = (np.stack([gx.ravel(), gy.ravel()], 1) + rng.uniform(-0.3, 0.3, (n, 2))) * step
    semi_a = step * rng.uniform(0.45, 0.62, n)
    semi_b = semi_a * rng.uniform(0.6, 1.0, n)
    angle = rng.uniform(0, 180, n)
    lumen_a = rng.uniform(0.25, 0.55, n)
    lumen_b = lumen_a * rng.uniform(0.2, 1.0, n)  # many lumens are collapsed slits
    epi = rng.uniform(0.24, 0.46, n)  # proximal tubules are more PAS-positive
    brush = rng.random(n) < 0.6
    line = max(1, int(round(0.012 * scale)))
    outside = _outside(centres[:, 0], centres[:, 1], glom, margin=0.1)
    for i in np.flatnonzero(outside):
        centre = (int(round(centres[i, 0])), int(round(centres[i, 1])))
        axes = (max(1, int(semi_a[i])), max(1, int(semi_b[i])))
        lum = (max(1, int(semi_a[i] * lumen_a[i])), max(1, int(semi_b[i] * lumen_b[i])))
        cv2.ellipse(canvas, centre, axes, angle[i], 0, 360, float(epi[i]), -1)
        cv2.ellipse(canvas, centre, lum, angle[i], 0, 360, 0.04, -1)
        if brush[i]:
            cv2.ellipse(canvas, centre, lum, angle[i], 0, 360, 0.62, line)
        cv2.ellipse(canvas, centre, axes, angle[i], 0, 360, 0.66, line)
    pas = canvas * (1.0 + 0.9 * grain + 0.15 * low)
    hema = np.full((h, w), 0.03, dtype=np.float32)

    # Epithelial nuclei sit in a ring between lumen and basement membrane.
    sel = np.flatnonzero(outside)
    idx = np.repeat(sel, rng.integers(4, 10, size=sel.size))
    t = rng.uniform(0, 2 * np.pi, idx.size)
    frac = (0.35 + 0.65 * lumen_a[idx]) * rng.uniform(0.85, 1.05, idx.size)
    lx, ly = semi_a[idx] * frac * np.cos(t), semi_b[idx] * frac * np.sin(t)
    rot = np.deg2rad(angle[idx])
    px = centres[idx, 0] + lx * np.cos(rot) - ly * np.sin(rot)
    py = centres[idx, 1] + lx * np.sin(rot) + ly * np.cos(rot)
    n_int = int(w * h / (0.35 * scale) ** 2)  # sparse interstitial cells
    px = np.concatenate([px, rng.uniform(0, w, n_int)])
    py = np.concatenate([py, rng.uniform(0, h, n_int)])
    ok = (px >= 0) & (px < w) & (py >= 0) & (py < h)
    px, py = px[ok], py[ok]
    ok = _outside(px, py, glom, margin=0.02)  # the glomerulus places its own nuclei
    seeds = np.zeros((h, w), dtype=np.uint8)
    seeds[py[ok].astype(np.intp), px[ok].astype(np.intp)] = rng.integers(110, 220, int(ok.sum()),
                                                                         dtype=np.uint8)

    if rng.random() < GLASS_PROBABILITY:  # crop reaches the edge of the section: bare glass
        phi = rng.uniform(0, 2 * np.pi)
        nx, ny = np.cos(phi), np.sin(phi)
        edge = reach * np.hypot(ax * nx, ay * ny) * rng.uniform(1.1, 1.4)
        dist = (np.arange(w, dtype=np.float32)[None, :] - cx) * nx + (
            np.arange(h, dtype=np.float32)[:, None] - cy) * ny
        tissue = _soft(edge - dist + 0.08 * scale * low, 0.7)
        pas *= tissue
        hema *= tissue
        seeds[tissue < 0.5] = 0
    return pas, hema, seeds


def _outside(px: np.ndarray, py: np.ndarray, glom, margin: float) -> np.ndarray:
    """Which points lie outside the glomerulus (plus margin, in capsule radii)."""
    cx, cy, ax, ay, r_caps, reach = glom
    ex, ey = (px - cx) / ax, (py - cy) / ay
    t = ((np.arctan2(ey, ex) + np.pi) * (THETA_BINS / (2 * np.pi))).astype(np.intp) % THETA_BINS
    return np.hypot(ex, ey) / r_caps[t] > reach + margin


def _colourise(pas, hema, stain: _Stain, scale: float, difficulty: float, rng) -> np.ndarray:
    """Beer-Lambert: transmitted light = white * exp(-hema * OD_h) * exp(-pas * OD_p).

    The product is separable, so each factor is an 8-bit table look-up of the quantised density:
    several times faster than exp over (h, w, 3) floats, and the stain grain hides the steps.
    """
    # Small per-image drift on top of the per-biopsy stain (section thickness).
    thick = float(np.exp(0.06 * (0.5 + difficulty) * rng.standard_normal()))
    levels = np.arange(256)[:, None]
    hema_od = np.asarray(stain.hema_od) * (HEMA_MAX / 255 * thick)
    pas_od = np.asarray(stain.pas_od) * (PAS_MAX / 255 * thick)
    lut_h = np.asarray(stain.white) * np.exp(-levels * hema_od)
    lut_p = 255.0 * np.exp(-levels * pas_od)
    hq = cv2.convertScaleAbs(hema, alpha=255 / HEMA_MAX)  # rounds and saturates
    pq = cv2.convertScaleAbs(pas, alpha=255 / PAS_MAX)
    t_h = cv2.LUT(cv2.merge([hq, hq, hq]), np.rint(lut_h).astype(np.uint8).reshape(1, 256, 3))
    t_p = cv2.LUT(cv2.merge([pq, pq, pq]), np.rint(lut_p).astype(np.uint8).reshape(1, 256, 3))
    bgr = cv2.multiply(t_h, t_p, scale=1.0 / 255)
    sigma = stain.blur * (1.0 + 0.3 * rng.random()) * min(1.0, scale / 150.0)
    if sigma > 0.3:
        bgr = cv2.GaussianBlur(bgr, (0, 0), sigma)
    return bgr
