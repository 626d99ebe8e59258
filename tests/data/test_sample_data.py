"""Tests of the synthetic CMIL-layout sample generator (tiny images, so they run in seconds)."""

from __future__ import annotations

import csv
import hashlib
import re
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from glomeruli.data import sample_data
from glomeruli.data.sample_data import SampleSummary, generate_sample_dataset

TINY = (48, 96)
NAME_RE = re.compile(r"^SYNTH-[^_]+_PAS_\d+of\d+_[0-9a-f]{24}\.png$")
CLASS_DIRS = {"globally_sclerotic_glomeruli": 1, "non_globally_sclerotic_glomeruli": 0}


def _make(out: Path, n: int = 24, **kw) -> SampleSummary:
    kw.setdefault("size_range", TINY)
    kw.setdefault("progress", False)
    return generate_sample_dataset(out, n, **kw)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _pngs(root: Path) -> dict[str, int]:
    """File name -> label implied by its class folder."""
    return {p.name: label for sub, label in CLASS_DIRS.items() for p in (root / sub).glob("*.png")}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, SampleSummary]:
    root = tmp_path_factory.mktemp("synth") / "raw"
    return root, _make(root, 30, seed=1)


def test_layout_and_csv_match_files(dataset):
    root, summary = dataset
    assert summary.root == root
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [*CLASS_DIRS, "public.csv", "SYNTHETIC_DATA.txt"])
    lines = (root / "public.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "name,ground truth"
    rows = list(csv.DictReader(lines))
    names = [r["name"] for r in rows]
    assert names == sorted(names)
    on_disk = _pngs(root)
    assert {r["name"]: int(r["ground truth"]) for r in rows} == on_disk
    assert summary.n_images == len(on_disk) == 30
    assert summary.n_sclerotic == sum(on_disk.values())
    assert 2 <= summary.n_sclerotic <= 28


def test_marker_file_describes_synthetic_data(dataset):
    root, _ = dataset
    text = (root / "SYNTHETIC_DATA.txt").read_text(encoding="utf-8")
    assert "SYNTHETIC" in text and "seed: 1" in text and "difficulty: 0.3" in text


def test_names_and_biopsy_grouping(dataset):
    root, summary = dataset
    names = list(_pngs(root))
    assert all(NAME_RE.match(n) for n in names), [n for n in names if not NAME_RE.match(n)]
    parsed = [re.match(r"^(.+?)_PAS_(\d+)of(\d+)_", n).groups() for n in names]
    per_biopsy = Counter(b for b, _, _ in parsed)
    assert len(per_biopsy) == summary.n_biopsies >= 2
    for biopsy, count in per_biopsy.items():
        ks = sorted(int(k) for b, k, _ in parsed if b == biopsy)
        assert ks == list(range(1, count + 1))
        assert {int(n) for b, _, n in parsed if b == biopsy} == {count}


def test_pngs_are_rgba_opaque_in_size_range_and_tagged(dataset):
    root, _ = dataset
    for sub in CLASS_DIRS:
        for path in (root / sub).glob("*.png"):
            img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            assert img is not None and img.dtype == np.uint8 and img.ndim == 3
            assert img.shape[2] == 4
            assert (img[..., 3] == 255).all()
            h, w = img.shape[:2]
            assert TINY[0] <= h <= TINY[1] and TINY[0] <= w <= TINY[1]
            with Image.open(path) as im:
                assert im.mode == "RGBA"
                assert "synthetic glomeruli sample" in im.text.get("Comment", "")


def test_sizes_vary_independently(tmp_path):
    _make(tmp_path / "a", 24, seed=5, size_range=(40, 120))
    paths = (tmp_path / "a").rglob("*.png")
    shapes = {cv2.imread(str(p), cv2.IMREAD_UNCHANGED).shape[:2] for p in paths}
    assert len({h for h, _ in shapes}) > 5 and len({w for _, w in shapes}) > 5
    assert any(h != w for h, w in shapes)


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    _make(tmp_path / "a", seed=7)
    _make(tmp_path / "b", seed=7)
    _make(tmp_path / "c", seed=8)
    a, b, c = (_files(tmp_path / x) for x in "abc")
    assert a == b
    assert set(a) != set(c)
    assert {v for k, v in a.items() if k.endswith(".png")}.isdisjoint(c.values())


@pytest.mark.parametrize("n_sites", [1, 3])
def test_workers_do_not_change_bytes(tmp_path, n_sites):
    _make(tmp_path / "one", 16, seed=3, workers=1, n_sites=n_sites)
    _make(tmp_path / "two", 16, seed=3, workers=2, n_sites=n_sites)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def _centre_stats(root: Path) -> dict[int, np.ndarray]:
    """Per image: mean saturation and bright-white fraction of the central 40 % box."""
    stats: dict[int, list] = {0: [], 1: []}
    for name, label in _pngs(root).items():
        sub = next(s for s, lab in CLASS_DIRS.items() if lab == label)
        img = cv2.imread(str(root / sub / name), cv2.IMREAD_UNCHANGED)
        h, w = img.shape[:2]
        centre = img[3 * h // 10:7 * h // 10, 3 * w // 10:7 * w // 10, :3]
        hsv = cv2.cvtColor(centre, cv2.COLOR_BGR2HSV)
        white = (hsv[..., 2] > 200) & (hsv[..., 1] < 50)
        stats[label].append((hsv[..., 1].mean(), white.mean()))
    return {k: np.array(v) for k, v in stats.items()}


def test_classes_differ_as_described_at_difficulty_zero(tmp_path):
    _make(tmp_path / "easy", 40, seed=3, difficulty=0.0, sclerotic_fraction=0.5,
          size_range=(64, 96))
    s = _centre_stats(tmp_path / "easy")
    # Dense magenta cellular tuft vs pale pink-lilac matrix: saturation alone separates them.
    assert s[0][:, 0].min() > s[1][:, 0].max() + 10
    # Open capillary lumens (bright white) are common in the normal tuft, rare in the scar.
    assert s[0][:, 1].mean() > 2 * s[1][:, 1].mean()


def test_difficulty_blends_the_classes(tmp_path):
    _make(tmp_path / "easy", 40, seed=3, difficulty=0.0, sclerotic_fraction=0.5)
    _make(tmp_path / "hard", 40, seed=3, difficulty=1.0, sclerotic_fraction=0.5)
    gap = {}
    for name in ("easy", "hard"):
        s = _centre_stats(tmp_path / name)
        gap[name] = s[0][:, 0].mean() - s[1][:, 0].mean()
    assert 0 < gap["hard"] < gap["easy"]


def test_refuses_non_empty_real_folder(tmp_path):
    real = tmp_path / "raw"
    real.mkdir()
    (real / "patient.png").write_bytes(b"not synthetic")
    with pytest.raises(FileExistsError, match="SYNTHETIC_DATA.txt"):
        _make(real)
    assert [p.name for p in real.iterdir()] == ["patient.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no temporary left behind


def test_refuses_a_file_as_out_dir(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(FileExistsError):
        _make(target)


def test_regenerates_over_previous_synthetic_dataset(tmp_path):
    out = tmp_path / "raw"
    out.mkdir()  # an empty folder is fine too
    _make(out, 12, seed=1)
    summary = _make(out, 8, seed=2)
    assert summary.n_images == len(_pngs(out)) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]
    fresh = tmp_path / "fresh"
    _make(fresh, 8, seed=2)
    assert _files(out) == _files(fresh)


def test_refuses_synthetic_folder_with_foreign_files(tmp_path):
    out = tmp_path / "raw"
    _make(out, 8)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        _make(out, 8)
    assert (out / "notes.txt").exists()


def test_refuses_the_current_directory(tmp_path, monkeypatch):
    out = tmp_path / "raw"
    _make(out, 6)
    monkeypatch.chdir(out)
    with pytest.raises(ValueError, match="out_dir"):
        _make(Path("."), 6)


def test_progress_is_logged_without_a_tty(tmp_path, caplog):
    caplog.set_level("INFO", logger="glomeruli.data.sample_data")
    generate_sample_dataset(tmp_path / "raw", 20, size_range=TINY, progress=True)
    messages = [r.getMessage() for r in caplog.records]
    done = [m for m in messages if m.startswith("synthetic images:")]
    assert done[-1] == "synthetic images: 20/20" and 5 <= len(done) <= 11


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"n_images": 3}, "n_images"),
        ({"sclerotic_fraction": 0.0}, "sclerotic_fraction"),
        ({"sclerotic_fraction": 1.0}, "sclerotic_fraction"),
        ({"difficulty": -0.1}, "difficulty"),
        ({"difficulty": 1.5}, "difficulty"),
        ({"size_range": (15, 40)}, "size_range"),
        ({"size_range": (80, 40)}, "size_range"),
        ({"n_biopsies": 0}, "n_biopsies"),
        ({"workers": -1}, "workers"),
        ({"seed": -1}, "seed"),
    ],
)
def test_validation_names_the_argument(tmp_path, kwargs, arg):
    kwargs = {"n_images": 8, "size_range": TINY, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=arg):
        generate_sample_dataset(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("n", "fraction"), [(4, 0.18), (5, 0.01), (6, 0.99), (200, 0.18), (997, 0.3)])
def test_plan_keeps_two_of_each_class(n, fraction):
    jobs, n_bio = sample_data._plan(n, fraction, 0.3, 0, (250, 950), None)
    labels = [j.label for j in jobs]
    assert len(jobs) == n and min(labels.count(0), labels.count(1)) >= 2
    assert 1 <= n_bio <= n and len({j.name for j in jobs}) == n


def test_plan_has_biopsies_without_sclerotic_glomeruli():
    jobs, n_bio = sample_data._plan(600, 0.18, 0.3, 0, (250, 950), None)
    per_biopsy: dict[str, list[int]] = {}
    for j in jobs:
        per_biopsy.setdefault(j.name.split("_PAS_")[0], []).append(j.label)
    assert len(per_biopsy) == n_biopsies_expected(600) == n_bio
    assert any(sum(v) == 0 for v in per_biopsy.values())
    assert len({len(v) for v in per_biopsy.values()}) > 3  # uneven biopsy sizes
    assert abs(sum(j.label for j in jobs) / 600 - 0.18) < 0.01


def n_biopsies_expected(n: int) -> int:
    return max(2, round(n / sample_data.IMAGES_PER_BIOPSY))


def _colour_features(root: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per image at 64 px: mean and spread of each channel and 8-bin colour histograms; label; biopsy."""
    x, y, groups = [], [], []
    for name, label in sorted(_pngs(root).items()):
        sub = next(s for s, lab in CLASS_DIRS.items() if lab == label)
        img = cv2.imread(str(root / sub / name))
        pixels = cv2.resize(img, (64, 64), interpolation=cv2.INTER_AREA).reshape(-1, 3).astype(float)
        hist = [np.histogram(pixels[:, ch], bins=8, range=(0, 256))[0] / len(pixels) for ch in range(3)]
        x.append(np.concatenate([pixels.mean(0), pixels.std(0), *hist]))
        y.append(label)
        groups.append(name.split("_PAS_")[0])
    return np.array(x), np.array(y), groups


def _colour_auc(root: Path) -> float:
    """ROC-AUC of a logistic regression on colour statistics, cross-validated by biopsy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y, groups = _colour_features(root)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    folds = StratifiedGroupKFold(5, shuffle=True, random_state=0)
    return roc_auc_score(y, cross_val_predict(model, x, y, groups=groups, cv=folds, method="predict_proba")[:, 1])


def test_structure_only_classes_do_not_differ_in_colour(tmp_path):
    """The hard set: colour, brightness and nucleus count alone do not separate the classes, while they do at the
    default setting (many small biopsies, so no biopsy's stain happens to go with one class)."""
    common = dict(seed=2, difficulty=0.3, sclerotic_fraction=0.5, size_range=(64, 128), n_biopsies=90)
    _make(tmp_path / "easy", 180, **common)
    _make(tmp_path / "hard", 180, structure_only=True, **common)
    assert _colour_auc(tmp_path / "easy") > 0.95
    assert _colour_auc(tmp_path / "hard") < 0.75
    assert "structure_only: true" in (tmp_path / "hard" / "SYNTHETIC_DATA.txt").read_text(encoding="utf-8")


def test_structure_only_classes_differ_in_structure(tmp_path):
    """Open lumens make the normal tuft's white pixels few large blobs; the scar's are long thin clefts:
    the white area's perimeter per area (a structure measure, not a colour one) separates the classes."""
    _make(tmp_path / "hard", 40, seed=3, structure_only=True, sclerotic_fraction=0.5, size_range=(200, 240))
    shape = {0: [], 1: []}
    for name, label in _pngs(tmp_path / "hard").items():
        sub = next(s for s, lab in CLASS_DIRS.items() if lab == label)
        img = cv2.imread(str(tmp_path / "hard" / sub / name))
        h, w = img.shape[:2]
        centre = img[h // 4:3 * h // 4, w // 4:3 * w // 4]
        white = ((centre.min(axis=2) > 200)).astype(np.uint8)
        n_parts = cv2.connectedComponents(white)[0] - 1
        shape[label].append(n_parts / max(1, white.sum()) * 100)
    assert np.median(shape[0]) > 1.5 * np.median(shape[1]), shape


# --------------------------------------------------------------------------------------------
# Several sites (`n_sites`, `glomeruli sample-data --sites N`)

SITE_NAME_RE = re.compile(r"^SYNTH-(SITE[1-3])_B(\d{3})_PAS_\d+of\d+_[0-9a-f]{24}\.png$")
RECOMMENDED_SITE_REGEX = r"^SYNTH-(?P<site>SITE\d+)_"  # what the report, marker and CLI help recommend
CMIL_GROUP_REGEX = r"^(?P<group>.+?)_PAS_"


def _digest(root: Path) -> tuple[int, str, str]:
    """(PNG count, sha256 over the PNGs' names and decoded pixels, sha256 over public.csv and the marker), with
    the version and the generator's module path masked: they name the code, not the sample."""
    from glomeruli import __version__

    pngs = hashlib.sha256()
    files = sorted(root.rglob("*.png"))
    for path in files:
        pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        pngs.update(path.relative_to(root).as_posix().encode() + b"\0" + str(pixels.shape).encode() + pixels.tobytes())
    text = hashlib.sha256()
    for name in ("public.csv", "SYNTHETIC_DATA.txt"):
        content = (root / name).read_text(encoding="utf-8").replace(__version__, "VERSION")
        text.update(re.sub(r"glomeruli(\.data)?\.sample_data", "GENERATOR", content).encode())
    return len(files), pngs.hexdigest(), text.hexdigest()


def test_one_site_is_the_sample_written_before_sites_existed(tmp_path):
    """Digests of samples generated by the code before `n_sites` existed (recorded then, written out here).
    A new OpenCV or NumPy may change PNG bytes: regenerate these with the previous release's generator then."""
    generate_sample_dataset(tmp_path / "a", 12, seed=11, size_range=(48, 96), progress=False, n_sites=1)
    generate_sample_dataset(tmp_path / "b", 8, seed=12, size_range=(200, 220), structure_only=True, difficulty=0.6,
                            progress=False)
    assert _digest(tmp_path / "a") == (12, "2064d05fc4825f5f283ca910bd46f7ccd33113f32ec6e7555dead3e9c8332278",
                                       "ce2272ac09d9ddc60b1dadb34014830a0f4b671d68da0d8e0b3227d67bd853a7")
    assert _digest(tmp_path / "b") == (8, "67ce6159177eb9e927bba9ccf3b4cb100d81abe99ccd59893148a8424827d232",
                                       "a72aeda23bb5a1c4e5288fa4a47bd456941241c33107038260493e241889f188")


@pytest.fixture(scope="module")
def three_sites(tmp_path_factory) -> tuple[Path, SampleSummary]:
    root = tmp_path_factory.mktemp("sites") / "raw"
    return root, _make(root, 60, seed=4, n_sites=3, sclerotic_fraction=0.3)


def _site_of(name: str) -> str:
    return re.match(RECOMMENDED_SITE_REGEX, name).group("site")


def test_sites_appear_in_names_and_every_biopsy_belongs_to_one_site(three_sites):
    root, summary = three_sites
    names = list(_pngs(root))
    assert all(SITE_NAME_RE.match(n) for n in names), [n for n in names if not SITE_NAME_RE.match(n)]
    assert summary.n_sites == 3 and summary.n_images == len(names) == 60
    biopsies = {re.match(CMIL_GROUP_REGEX, n).group("group") for n in names}
    assert all(b.startswith("SYNTH-") for b in biopsies)  # the synthetic marker rule's prefix
    numbers = Counter(re.match(r"^SYNTH-SITE\d+_B(\d{3})$", b).group(1) for b in biopsies)
    assert set(numbers.values()) == {1}  # a biopsy number never appears under two sites
    per_site = Counter(_site_of(b) for b in biopsies)
    assert per_site == {"SITE1": 3, "SITE2": 3, "SITE3": 3} and summary.n_biopsies == 9
    assert Counter(_site_of(n) for n in names) == {"SITE1": 20, "SITE2": 20, "SITE3": 20}  # even shares


def _rule(site_images: list[int], n_sclerotic: int) -> np.ndarray:
    """The documented rule, computed here: logit(p_k) = c + 1.4 * (2k/(N-1) - 1), c from the overall count."""
    from scipy.optimize import brentq
    from scipy.special import expit

    offsets = 1.4 * np.linspace(-1, 1, len(site_images))
    c = brentq(lambda c: sum(m * expit(c + o) for m, o in zip(site_images, offsets)) - n_sclerotic, -20, 20)
    return expit(c + offsets)


def test_site_prevalence_follows_the_documented_rule(three_sites):
    root, _ = three_sites
    labels = _pngs(root)
    counts = {s: (sum(1 for n in labels if _site_of(n) == s), sum(v for n, v in labels.items() if _site_of(n) == s))
              for s in ("SITE1", "SITE2", "SITE3")}
    assert sum(scl for _, scl in counts.values()) == 18  # 30 % of 60
    expected = _rule([20, 20, 20], 18)  # about 7.6 %, 25 % and 57 %
    for (n, scl), p in zip(counts.values(), expected):
        assert abs(scl - n * p) < 1.0, (counts, expected)  # rounded to whole glomeruli (at least 2 per class)
    prevalences = [scl / n for n, scl in counts.values()]
    assert prevalences == sorted(prevalences) and prevalences[2] - prevalences[0] > 0.4
    marker = (root / "SYNTHETIC_DATA.txt").read_text(encoding="utf-8")
    assert "n_sites: 3" in marker and RECOMMENDED_SITE_REGEX in marker
    for site, (n, scl) in counts.items():
        assert f"site {site}: n_images {n}, n_biopsies 3, n_sclerotic {scl}, prevalence {scl / n:.3f}" in marker


def test_site_prevalence_rule_on_a_large_plan():
    jobs, n_bio = sample_data._plan(900, 0.18, 0.3, 0, (250, 950), None, n_sites=4)
    sites = sorted({j.site for j in jobs})
    assert sites == ["SITE1", "SITE2", "SITE3", "SITE4"] and n_bio == 75  # 900 / 12 images per biopsy
    shares = [np.mean([j.label for j in jobs if j.site == s]) for s in sites]
    expected = _rule([225] * 4, 162)
    assert np.allclose(shares, expected, atol=1 / 225), (shares, expected)
    assert shares[0] < 0.06 and shares[-1] > 0.35  # about 4 % to 40 % around 18 %
    biopsy_sites = {}
    for j in jobs:
        biopsy_sites.setdefault(j.name.split("_PAS_")[0], set()).add(j.site)
    assert all(len(s) == 1 for s in biopsy_sites.values())


def test_smallest_multi_site_plan_keeps_three_biopsies_and_both_classes_per_site():
    jobs, n_bio = sample_data._plan(12, 0.18, 0.3, 0, (250, 950), None, n_sites=3)
    assert n_bio == 9
    for site in ("SITE1", "SITE2", "SITE3"):
        mine = [j for j in jobs if j.site == site]
        assert len({j.name.split("_PAS_")[0] for j in mine}) == 3
        assert sorted(j.label for j in mine) == [0, 0, 1, 1]


def _frame_colour(path: Path) -> np.ndarray:
    """Mean CIELAB colour of the crop's outer frame (surrounding tissue and glass, not the glomerulus)."""
    img = cv2.imread(str(path))
    h, w = img.shape[:2]
    frame = np.ones((h, w), bool)
    frame[h // 5:4 * h // 5, w // 5:4 * w // 5] = False
    return cv2.cvtColor(img, cv2.COLOR_BGR2LAB)[frame].astype(float).mean(0)


def test_sites_differ_in_colour_more_than_biopsies_within_a_site(three_sites):
    root, _ = three_sites
    by_biopsy: dict[str, list[np.ndarray]] = {}
    for sub in CLASS_DIRS:
        for path in (root / sub).glob("*.png"):
            by_biopsy.setdefault(path.name.split("_PAS_")[0], []).append(_frame_colour(path))
    biopsy_mean = {b: np.mean(v, 0) for b, v in by_biopsy.items()}
    site_mean = {s: np.mean([m for b, m in biopsy_mean.items() if _site_of(b) == s], 0)
                 for s in ("SITE1", "SITE2", "SITE3")}
    within = np.mean([np.sum((m - site_mean[_site_of(b)]) ** 2) for b, m in biopsy_mean.items()])
    grand = np.mean(list(site_mean.values()), 0)
    between = np.mean([np.sum((m - grand) ** 2) for m in site_mean.values()])
    assert between > 3 * within, (between, within)


def test_a_site_changes_colour_not_structure(monkeypatch):
    """The glomerulus drawn for an image is the same whichever site's stain and scanner it gets."""
    import dataclasses

    jobs, _ = sample_data._plan(12, 0.3, 0.3, 0, (64, 64), None, n_sites=3)
    job = jobs[0]
    other = next(j.stain for j in jobs if j.site != job.site)
    densities, colourise = [], sample_data._colourise

    def recording_colourise(pas, hema, *args):
        densities.append((pas.copy(), hema.copy()))
        return colourise(pas, hema, *args)

    monkeypatch.setattr(sample_data, "_colourise", recording_colourise)
    own = sample_data._render(job)
    # The same surrounding-tissue density, so the density maps must match everywhere.
    moved = sample_data._render(dataclasses.replace(job, stain=dataclasses.replace(other, tissue=job.stain.tissue)))
    (pas_a, hema_a), (pas_b, hema_b) = densities
    np.testing.assert_array_equal(pas_a, pas_b)
    np.testing.assert_array_equal(hema_a, hema_b)
    assert np.abs(own.astype(int) - moved.astype(int)).mean() > 5  # but the pixels differ


def test_multi_site_folder_ingests_with_biopsy_groups(three_sites, tmp_path):
    """The CMIL ingest settings read a multi-site sample; the synthetic-data guard still holds."""
    import shutil

    from glomeruli.data.ingest import IngestConfig, IngestError, ingest_dataset

    root, _ = three_sites
    config = IngestConfig(class_dirs=CLASS_DIRS, labels_csv="public.csv", group_regex=CMIL_GROUP_REGEX,
                          max_pixels=40_000_000, max_unreadable_fraction=0.0, workers=1)
    rows = ingest_dataset(root, config).rows
    assert len(rows) == 60
    assert {r.group for r in rows} == {r.name.split("_PAS_")[0] for r in rows}
    assert all(re.match(r"^SYNTH-SITE[1-3]_B\d{3}$", r.group) for r in rows)
    assert {_site_of(r.name) for r in rows} == {"SITE1", "SITE2", "SITE3"}
    mixed = tmp_path / "mixed"
    shutil.copytree(root, mixed)
    shutil.copy(next((mixed / "globally_sclerotic_glomeruli").glob("*.png")),
                mixed / "globally_sclerotic_glomeruli" / "SITE1_patient_PAS_1of1.png")
    with pytest.raises(IngestError, match="SITE1_patient_PAS_1of1.png"):
        ingest_dataset(mixed, config)


@pytest.mark.parametrize(
    ("kwargs", "needs"),
    [
        ({"n_sites": 0}, "integer >= 1"),
        ({"n_sites": 3, "n_images": 11}, "at least 12 images"),
        ({"n_sites": 2, "n_images": 20, "n_biopsies": 5}, "at least 6 biopsies"),
    ],
)
def test_impossible_sites_are_refused_naming_the_option(tmp_path, kwargs, needs):
    from glomeruli.core.errors import UserError

    kwargs = {"n_images": 24, "size_range": TINY, "progress": False, **kwargs}
    with pytest.raises(UserError, match=f"--sites.*{needs}"):
        generate_sample_dataset(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_cli_sites_option(tmp_path, capsys):
    from glomeruli.commands.cli import main

    out = tmp_path / "sample"
    assert main(["sample-data", str(out), "-n", "8", "--sites", "2", "--size-range", "48", "64",
                 "--workers", "1"]) == 0
    assert {_site_of(n) for n in _pngs(out)} == {"SITE1", "SITE2"}
    assert main(["sample-data", str(tmp_path / "no"), "-n", "8", "--sites", "3"]) == 1
    assert "--sites 3 needs at least 12 images" in capsys.readouterr().err
