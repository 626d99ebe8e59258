"""Errors you can see: which test images the model got wrong (errors.png) and where it looked
(gradcam.png), as labelled tile sheets; the heatmaps come from gradcam.py."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training boxes and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from glomeruli.evaluation.gradcam import Focus, efficientnet_cam_parts, gradcam, gradcam_focus  # noqa: E402
from glomeruli.data.h5store import ImageStore  # noqa: E402

COLUMNS = 6
TILE_INCHES = 2.0
SHORT_CLASS = ("non-GS", "GS")  # label 0, 1


@dataclass(frozen=True)
class Section:
    title: str
    indices: np.ndarray  # rows of the test arrays shown in this section, in display order


def error_sections(labels: np.ndarray, prob: np.ndarray, threshold: float, max_tiles: int) -> list[Section]:
    """False negatives, then false positives, most confidently wrong first; at most `max_tiles` in all,
    shared between the two in proportion to their numbers (each keeps at least one when it has any)."""
    labels, prob = np.asarray(labels), np.asarray(prob)
    predicted = prob >= threshold
    fn = np.flatnonzero((labels == 1) & ~predicted)
    fp = np.flatnonzero((labels == 0) & predicted)
    fn, fp = fn[np.argsort(prob[fn], kind="stable")], fp[np.argsort(-prob[fp], kind="stable")]
    total = len(fn) + len(fp)
    if total > max_tiles:
        keep_fn = min(len(fn), max(int(round(max_tiles * len(fn) / total)), 1 if len(fn) else 0))
        keep_fn = min(keep_fn, max_tiles - min(len(fp), 1))
        fn, fp = fn[:keep_fn], fp[:max_tiles - keep_fn]
    return [Section(f"False negatives: globally sclerotic called non-GS ({len(fn)} shown of "
                    f"{int(((labels == 1) & ~predicted).sum())})", fn),
            Section(f"False positives: non-GS called globally sclerotic ({len(fp)} shown of "
                    f"{int(((labels == 0) & predicted).sum())})", fp)]


def correct_sections(labels: np.ndarray, prob: np.ndarray, threshold: float, per_class: int) -> list[Section]:
    """`per_class` correctly classified images of each class, spread evenly over their range of
    probabilities (the most and the least confident included): representative, and no randomness."""
    labels, prob = np.asarray(labels), np.asarray(prob)
    predicted = (prob >= threshold).astype(int)
    sections = []
    for label, name in ((1, "globally sclerotic"), (0, "non-globally sclerotic")):
        correct = np.flatnonzero((labels == label) & (predicted == label))
        correct = correct[np.argsort(-prob[correct], kind="stable")]
        if len(correct) > per_class:
            correct = correct[np.unique(np.linspace(0, len(correct) - 1, per_class).round().astype(int))]
        sections.append(Section(f"Correct {name} ({len(correct)} shown)", correct[:per_class]))
    return sections


def tile_caption(name: str, label: int, probability: float) -> str:
    """File name (wrapped to fit the tile), true class and probability."""
    wrapped = "\n".join(textwrap.wrap(name, 26, break_on_hyphens=False)[:2])
    return f"{wrapped}\ntrue {SHORT_CLASS[int(label)]} \u00b7 p={probability:.3f}"


def heat_overlay(heatmap: np.ndarray) -> np.ndarray:
    """RGBA overlay: jet colours, opacity growing with the heat, so cold regions leave the tissue visible."""
    rgba = plt.get_cmap("jet")(np.clip(heatmap, 0.0, 1.0))
    rgba[..., 3] = 0.6 * np.clip(heatmap, 0.0, 1.0)
    return rgba


def plot_tile_sheet(out_png: Path, title: str, sections: list[Section], images: np.ndarray, names: np.ndarray,
                    labels: np.ndarray, prob: np.ndarray, heatmaps: dict[int, np.ndarray] | None = None,
                    empty_note: str = "none", focus: dict[int, tuple[float, float]] | None = None) -> None:
    """Sections of labelled tiles, up to COLUMNS per row; with `heatmaps` (row -> HxW in [0, 1]) each tile
    carries its Grad-CAM overlay, and with `focus` (row -> shares of heat on tissue and centre) those shares.
    `images` are the test images (uint8 RGB), indexed like the other arrays."""
    columns = min(COLUMNS, max([3] + [len(s.indices) for s in sections]))
    rows_per_section = [-(-len(s.indices) // columns) for s in sections]
    # inches: every row is a caption band above a tile; a section adds its title band and a bottom margin
    caption, header, margin, title_h, empty_h = 0.55, 0.3, 0.15, 0.45, 0.45
    heights = [title_h] + [header + (r * (caption + TILE_INCHES) if r else empty_h) + margin for r in rows_per_section]
    fig = plt.figure(figsize=(columns * TILE_INCHES, sum(heights)))
    subfigs = fig.subfigures(len(heights), 1, height_ratios=heights)
    subfigs[0].suptitle(title, fontsize=10, x=0.01, ha="left", y=0.7)
    for subfig, section, n_rows in zip(subfigs[1:], sections, rows_per_section):
        subfig.suptitle(section.title, fontsize=9.5, fontweight="bold", x=0.01, ha="left", y=0.995)
        if not n_rows:  # nothing to show: one line, not a row of empty tiles
            subfig.text(0.01, 0.45, empty_note, fontsize=9)
            continue
        axes = np.atleast_1d(subfig.subplots(n_rows, columns)).reshape(-1)
        for ax in axes:
            ax.axis("off")
        for ax, i in zip(axes, section.indices):
            ax.imshow(images[i])
            text = tile_caption(str(names[i]), int(labels[i]), float(prob[i]))
            if heatmaps is not None:
                ax.imshow(heat_overlay(heatmaps[i]))
                if not heatmaps[i].max() > 0:
                    text += " \u00b7 no evidence"
                elif focus is not None and i in focus:
                    text += f"\nheat on tissue {focus[i][0]:.0%} \u00b7 centre {focus[i][1]:.0%}"
            ax.set_title(text, fontsize=6.5, pad=3)
        height = header + n_rows * (caption + TILE_INCHES) + margin
        subfig.subplots_adjust(left=0.01, right=0.99, top=1 - (header + caption) / height, bottom=margin / height,
                               wspace=0.06, hspace=caption / TILE_INCHES)
    fig.savefig(out_png, dpi=110, metadata={"Software": None})
    plt.close(fig)


def focus_sample(n_test: int, limit: int) -> np.ndarray:
    """Test rows whose Grad-CAM focus is averaged: all, or `limit` evenly spaced (deterministic)."""
    if limit == 0 or n_test <= limit:
        return np.arange(n_test, dtype=np.int64)
    return np.unique(np.linspace(0, n_test - 1, limit).round().astype(np.int64))


def focus_summary(focus: Focus) -> dict:
    """Means over the images with any heat; beside them the area shares an evenly spread map would score."""
    scored = np.isfinite(focus.tissue)
    mean = (lambda v: float(np.mean(v[scored])) if scored.any() else None)
    return {"images": int(scored.sum()), "images_without_heat": int((~scored).sum()),
            "heat_on_tissue": mean(focus.tissue), "tissue_area": mean(focus.tissue_area),
            "heat_on_centre": mean(focus.centre), "centre_area": focus.centre_area}


def write_error_sheets(folder: Path, model, store_path: Path, test, threshold: float, *, max_tiles: int,
                       per_class: int, batch_size: int, focus_images: int = 0) -> dict:
    """errors.png (every false negative and positive, up to `max_tiles`) and gradcam.png (those and
    `per_class` correct cases of each class, with their Grad-CAM overlays and focus). `test`: evaluate.TestSet.

    Returns the Grad-CAM focus (gradcam.gradcam_focus) averaged over `focus_images` test images (0: all)."""
    errors = error_sections(test.labels, test.probability, threshold, max_tiles)
    correct = correct_sections(test.labels, test.probability, threshold, per_class)
    shown = np.unique(np.concatenate([s.indices for s in errors + correct]).astype(np.int64))
    sampled = focus_sample(len(test.rows), focus_images)
    mapped = np.union1d(shown, sampled)
    with ImageStore(store_path) as store:
        images = np.zeros((len(test.rows), store.image_size, store.image_size, 3), np.uint8)
        images[mapped] = store.read(test.rows[mapped])
        fill = tuple(int(c) for c in store.attrs["fill"])
    n_errors = sum(len(s.indices) for s in errors)
    plot_tile_sheet(folder / "errors.png", f"Test errors at threshold {threshold:.3f} ({n_errors} shown; "
                    "true class and probability under each image)", errors, images, test.names, test.labels,
                    test.probability, empty_note="none on the test set")
    heat, per_tile, summary = {}, {}, focus_summary(gradcam_focus(np.zeros((0, 1, 1)), images[:0], fill))
    if len(mapped):
        maps = gradcam(efficientnet_cam_parts(model), images[mapped].astype(np.float32),
                       towards_positive=test.probability[mapped] >= threshold, batch_size=batch_size)
        heat = dict(zip(mapped.tolist(), maps))
        focus = gradcam_focus(maps, images[mapped], fill)
        per_tile = {row: (focus.tissue[k], focus.centre[k]) for k, row in enumerate(mapped.tolist())}
        summary = focus_summary(gradcam_focus(maps[np.isin(mapped, sampled)], images[sampled], fill))
    title = "Grad-CAM (last convolutional layer): red = evidence for the class the model predicted"
    if summary["images"]:
        title += (f"\nTest set ({summary['images']} images): {summary['heat_on_tissue']:.0%} of the heat on tissue "
                  f"({summary['tissue_area']:.0%} of the area), {summary['heat_on_centre']:.0%} on the central "
                  f"square ({summary['centre_area']:.0%} of the area)")
    plot_tile_sheet(folder / "gradcam.png", title, errors + correct, images, test.names, test.labels,
                    test.probability, heatmaps=heat, empty_note="none on the test set", focus=per_tile)
    return summary
