"""The one loader of params.yaml: reads, types and validates every setting before work starts.

Every stage and command reads params.yaml through `load_params`, which checks every key before any work, so a
bad value fails in one line naming the key instead of an hour into training; an unknown key is refused (with
the nearest known one), because a misspelt key would otherwise be silently ignored. Bounds that come from the
model or a converter (EfficientNetB3's block count, ONNX opsets) are constants here so params loads without
importing Keras.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from glomeruli.core.errors import UserError

# finetune.unfreeze_blocks counts EfficientNetB3's blocks (glomeruli.model.efficientnet.N_BLOCKS, which a test
# reads from the built network); the stem downsamples 32x, so smaller inputs break it.
MAX_UNFREEZE_BLOCKS = 7
MIN_IMAGE_SIZE = 32
# preprocess.stain_normalization (glomeruli.data.stain applies them; named here so params loads without it).
STAIN_NORMALIZATION_METHODS = ("none", "macenko", "reinhard")
# export.opset: tf2onnx 1.17 writes opsets 13-18 (jax2onnx 0.17 needs 18: export.py); onnxruntime 1.32 runs them all
MIN_OPSET, MAX_OPSET = 13, 18


class ParamsError(UserError, ValueError):
    """A bad value in params.yaml: the message names the key, the value and what is allowed."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` (no dot) as a float, as users mean it, not as a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def read_yaml(path_or_stream: Path | str | IO[str]) -> dict:
    if hasattr(path_or_stream, "read"):
        return yaml.load(path_or_stream, Loader=_Loader) or {}
    with open(path_or_stream, encoding="utf-8") as f:
        return yaml.load(f, Loader=_Loader) or {}


@dataclass(frozen=True)
class DataParams:
    source: str


@dataclass(frozen=True)
class IngestParams:
    class_dirs: dict[str, int]
    labels_csv: str | None
    group_regex: str
    site_regex: str | None  # None: every image at one site (h5store.SINGLE_SITE)
    max_pixels: int
    max_unreadable_fraction: float


@dataclass(frozen=True)
class PreprocessParams:
    image_size: int
    fill: tuple[int, int, int]
    stain_normalization: str  # none | macenko | reinhard (glomeruli.data.stain)


@dataclass(frozen=True)
class AugmentParams:
    copies_per_class: dict[int, int]
    scale: tuple[float, float]
    translate: float
    noise_std: float
    flip: bool
    rotate90: bool
    # colour jitter (glomeruli.data.stain.jitter_colour); 0 turns each off
    hed_scale: float  # each stain's concentration times U(1-x, 1+x)
    hed_shift: float  # plus U(-x, x), in optical density
    brightness: float
    contrast: float
    saturation: float
    hue: float  # fraction of the colour circle


@dataclass(frozen=True)
class SplitParams:
    group_by: str
    folds: int
    fold: int
    val_fraction: float


@dataclass(frozen=True)
class ModelParams:
    weights: str
    dropout: float


@dataclass(frozen=True)
class TrainParams:
    epochs: int
    batch_size: int
    lr: float
    class_weight: str
    patience: int


@dataclass(frozen=True)
class FinetuneParams(TrainParams):
    unfreeze_blocks: int | str  # 1..7, or "all" (every layer, stem included)
    online_augment: bool
    lr_schedule: str
    warmup_epochs: int


@dataclass(frozen=True)
class EvaluateParams:
    threshold_rule: str
    fixed_threshold: float
    threshold_resamples: int  # > 0: the median threshold over biopsy-bootstrap resamples of validation
    batch_size: int
    calibration: str
    bootstrap_resamples: int
    burden_cutoff: float
    max_error_tiles: int
    gradcam_examples: int
    gradcam_focus_images: int  # test images whose Grad-CAM focus is averaged (evenly spaced); 0 = every one


@dataclass(frozen=True)
class ExportParams:
    opset: int  # ONNX opset of models/export/model.onnx: what the runtime that loads it must support


@dataclass(frozen=True)
class RuntimeParams:
    workers: int
    cache_features: bool
    memory_budget_gb: float
    mixed_precision: str
    deterministic: str | bool  # "auto" (on CPU only), true or false
    devices: str | int  # "auto" (every local accelerator) or a count


@dataclass(frozen=True)
class Params:
    seed: int
    data: DataParams
    ingest: IngestParams
    preprocess: PreprocessParams
    augment: AugmentParams
    split: SplitParams
    model: ModelParams
    train_frozen: TrainParams
    finetune: FinetuneParams
    evaluate: EvaluateParams
    export: ExportParams
    runtime: RuntimeParams


# Mappings whose keys are the user's own (folder names, labels), not settings names.
_FREE_FORM = {"ingest.class_dirs", "augment.copies_per_class"}


def _check_keys(raw: Any, schema: type, prefix: str = "") -> None:
    """Refuse any key the schema does not have: a misspelt setting must stop the run, not be ignored."""
    if not isinstance(raw, dict):
        return
    known = {f.name: f for f in fields(schema)}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            candidates = [f"{prefix}{k}" for k in known]
            near = difflib.get_close_matches(dotted, candidates, n=1, cutoff=0.6)
            hint = f"did you mean `{near[0]}`?" if near else f"valid keys here: {', '.join(sorted(candidates))}"
            raise ParamsError(f"params.yaml: unknown key `{dotted}`: {hint} (a misspelt key would otherwise be "
                              "ignored; rename or remove it)")
        field_type = known[key].type
        nested = _SECTIONS.get(field_type) if isinstance(field_type, str) else None
        if nested is not None and dotted not in _FREE_FORM:
            _check_keys(value, nested, f"{dotted}.")


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ParamsError(f"params.yaml: `{key}` = {value!r} is invalid: {allowed}.")


def _number(key: str, value: Any, kind: type, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        _fail(key, value, f"expected {'an integer' if kind is int else 'a number'}")
    value = kind(value)
    if lo is not None and (value < lo or (lo_open and value == lo)):
        _fail(key, value, f"must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        _fail(key, value, f"must be <= {hi}")
    return value


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        _fail(key, value, f"allowed values are {', '.join(choices)}")
    return value


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        _fail(key, value, "expected true or false")
    return value


def _section(raw: dict, key: str) -> dict:
    section = raw.get(key)
    if not isinstance(section, dict):
        _fail(key, section, "expected a mapping of settings (see the params.yaml shipped with the project)")
    return section


def _get(section: dict, prefix: str, name: str) -> Any:
    if name not in section:
        raise ParamsError(f"params.yaml: `{prefix}.{name}` is missing; add it (see README, 'Parameters').")
    return section[name]


def _int_or_word(key: str, value: Any, word: str, lo: int, hi: int | None = None) -> int | str:
    if value == word:
        return word
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(key, value, f"expected {word} or an integer" + (f" {lo}-{hi}" if hi else f" >= {lo}"))
    return _number(key, value, int, lo, hi)


def _train(section: dict, prefix: str, min_epochs: int = 1) -> dict:
    g = lambda n: _get(section, prefix, n)  # noqa: E731
    return dict(
        epochs=_number(f"{prefix}.epochs", g("epochs"), int, min_epochs),
        batch_size=_number(f"{prefix}.batch_size", g("batch_size"), int, 1),
        lr=_number(f"{prefix}.lr", g("lr"), float, 0, 1, lo_open=True),
        class_weight=_choice(f"{prefix}.class_weight", g("class_weight"), ("balanced", "none")),
        patience=_number(f"{prefix}.patience", g("patience"), int, 0),
    )


def _rgb(key: str, value: Any) -> tuple[int, int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value] * 3
    if not isinstance(value, list) or len(value) != 3:
        _fail(key, value, "expected an integer 0-255 or a list of three, e.g. [0, 0, 0]")
    return tuple(_number(key, v, int, 0, 255) for v in value)  # type: ignore[return-value]


def parse_params(raw: dict) -> Params:
    """Type and validate a params mapping; raises ParamsError naming the first bad or unknown key."""
    if not isinstance(raw, dict):
        _fail("params.yaml", raw, "expected a mapping of sections (see the params.yaml shipped with the project)")
    _check_keys(raw, Params)
    ing, pre, aug = _section(raw, "ingest"), _section(raw, "preprocess"), _section(raw, "augment")
    spl, mdl, tf, ft = _section(raw, "split"), _section(raw, "model"), _section(raw, "train_frozen"), _section(raw, "finetune")
    ev, rt, data = _section(raw, "evaluate"), _section(raw, "runtime"), _section(raw, "data")
    ex = _section(raw, "export")

    class_dirs = _get(ing, "ingest", "class_dirs")
    if not isinstance(class_dirs, dict) or sorted(set(class_dirs.values())) != [0, 1] or len(class_dirs) != 2:
        _fail("ingest.class_dirs", class_dirs, "expected two folder names mapped to labels 0 and 1")
    group_regex = _get(ing, "ingest", "group_regex")
    try:
        if "group" not in re.compile(group_regex).groupindex:
            _fail("ingest.group_regex", group_regex, "needs a named group (?P<group>...)")
    except (re.error, TypeError) as err:
        _fail("ingest.group_regex", group_regex, f"not a regular expression ({err})")
    site_regex = _get(ing, "ingest", "site_regex")
    if site_regex is not None:
        try:
            if "site" not in re.compile(site_regex).groupindex:
                _fail("ingest.site_regex", site_regex, "needs a named group (?P<site>...), or null for one site")
        except (re.error, TypeError) as err:
            _fail("ingest.site_regex", site_regex, f"not a regular expression ({err}); or null for one site")

    copies = _get(aug, "augment", "copies_per_class")
    if not isinstance(copies, dict) or {str(k) for k in copies} != {"0", "1"}:
        _fail("augment.copies_per_class", copies, 'expected copies for both labels, e.g. {"0": 1, "1": 4}')
    scale = _get(aug, "augment", "scale")
    if not isinstance(scale, list) or len(scale) != 2:
        _fail("augment.scale", scale, "expected [min, max], e.g. [0.9, 1.1]")
    scale = tuple(_number("augment.scale", s, float, 0.1, 10) for s in scale)
    if scale[0] > scale[1]:
        _fail("augment.scale", list(scale), "min must not exceed max")

    folds = _number("split.folds", _get(spl, "split", "folds"), int, 2, 100)
    fold = _number("split.fold", _get(spl, "split", "fold"), int, 0)
    if fold >= folds:
        _fail("split.fold", fold, f"must be below split.folds ({folds}): folds are numbered 0 to {folds - 1}")
    val_fraction = _number("split.val_fraction", _get(spl, "split", "val_fraction"), float, 0, 1, lo_open=True)
    if val_fraction + 1 / folds >= 1:
        _fail("split.val_fraction", val_fraction, f"with {folds} folds the test set takes 1/{folds} of the data: "
              f"val_fraction + 1/folds must be below 1 so the train partition is not empty")

    weights = _get(mdl, "model", "weights")
    if weights is None:
        weights = "none"
    if not isinstance(weights, str):
        _fail("model.weights", weights, "expected imagenet, none or a path to a weights file")
    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        _fail("model.weights", weights, "no such file; give imagenet, none or an existing weights file")

    finetune = _train(ft, "finetune", min_epochs=0)  # 0: no fine-tuning, the frozen-phase model is the model
    finetune["unfreeze_blocks"] = _int_or_word("finetune.unfreeze_blocks", _get(ft, "finetune", "unfreeze_blocks"),
                                               "all", 1, MAX_UNFREEZE_BLOCKS)
    finetune["online_augment"] = _bool("finetune.online_augment", _get(ft, "finetune", "online_augment"))
    finetune["lr_schedule"] = _choice("finetune.lr_schedule", _get(ft, "finetune", "lr_schedule"),
                                      ("constant", "cosine"))
    finetune["warmup_epochs"] = _number("finetune.warmup_epochs", _get(ft, "finetune", "warmup_epochs"), int, 0)
    deterministic = _get(rt, "runtime", "deterministic")
    if deterministic != "auto" and not isinstance(deterministic, bool):
        _fail("runtime.deterministic", deterministic, "expected auto (on for CPU runs only), true or false")
    devices = _int_or_word("runtime.devices", _get(rt, "runtime", "devices"), "auto", 1)
    labels_csv = _get(ing, "ingest", "labels_csv")
    if labels_csv is not None and not isinstance(labels_csv, str):
        _fail("ingest.labels_csv", labels_csv, "expected a file name such as public.csv, or null")
    source = _get(data, "data", "source")
    if not isinstance(source, str) or not source:
        _fail("data.source", source, "expected a folder or .zip path")

    return Params(
        seed=_number("seed", raw.get("seed"), int, 0),
        data=DataParams(source=source),
        ingest=IngestParams(
            class_dirs={str(k): int(v) for k, v in class_dirs.items()},
            labels_csv=labels_csv or None,
            group_regex=group_regex,
            site_regex=site_regex,
            max_pixels=_number("ingest.max_pixels", _get(ing, "ingest", "max_pixels"), int, 1),
            max_unreadable_fraction=_number("ingest.max_unreadable_fraction",
                                            _get(ing, "ingest", "max_unreadable_fraction"), float, 0, 1),
        ),
        preprocess=PreprocessParams(
            image_size=_number("preprocess.image_size", _get(pre, "preprocess", "image_size"), int, MIN_IMAGE_SIZE, 2048),
            fill=_rgb("preprocess.fill", _get(pre, "preprocess", "fill")),
            stain_normalization=_choice("preprocess.stain_normalization",
                                        _get(pre, "preprocess", "stain_normalization"),
                                        STAIN_NORMALIZATION_METHODS),
        ),
        augment=AugmentParams(
            copies_per_class={int(k): _number(f"augment.copies_per_class.{k}", v, int, 0, 100) for k, v in copies.items()},
            scale=scale,  # type: ignore[arg-type]
            translate=_number("augment.translate", _get(aug, "augment", "translate"), float, 0, 0.5),
            noise_std=_number("augment.noise_std", _get(aug, "augment", "noise_std"), float, 0, 128),
            flip=_bool("augment.flip", _get(aug, "augment", "flip")),
            rotate90=_bool("augment.rotate90", _get(aug, "augment", "rotate90")),
            # Factors 1 +- x stay positive below 1; hue turns at most half the circle either way.
            **{name: _number(f"augment.{name}", _get(aug, "augment", name), float, 0, hi)
               for name, hi in (("hed_scale", 0.9), ("hed_shift", 1.0), ("brightness", 0.9), ("contrast", 0.9),
                                ("saturation", 1.0), ("hue", 0.5))},
        ),
        split=SplitParams(group_by=_choice("split.group_by", _get(spl, "split", "group_by"),
                                           ("biopsy", "image", "site")),
                          folds=folds, fold=fold, val_fraction=val_fraction),
        model=ModelParams(weights=weights,
                          dropout=_number("model.dropout", _get(mdl, "model", "dropout"), float, 0, 0.95)),
        train_frozen=TrainParams(**_train(tf, "train_frozen")),
        finetune=FinetuneParams(**finetune),
        evaluate=EvaluateParams(
            threshold_rule=_choice("evaluate.threshold_rule", _get(ev, "evaluate", "threshold_rule"),
                                   ("max_f1", "youden", "fixed")),
            fixed_threshold=_number("evaluate.fixed_threshold", _get(ev, "evaluate", "fixed_threshold"), float, 0, 1),
            threshold_resamples=_number("evaluate.threshold_resamples", _get(ev, "evaluate", "threshold_resamples"),
                                        int, 0, 100_000),
            batch_size=_number("evaluate.batch_size", _get(ev, "evaluate", "batch_size"), int, 1),
            calibration=_choice("evaluate.calibration", _get(ev, "evaluate", "calibration"), ("none", "temperature")),
            bootstrap_resamples=_number("evaluate.bootstrap_resamples", _get(ev, "evaluate", "bootstrap_resamples"),
                                        int, 0, 100_000),
            burden_cutoff=_number("evaluate.burden_cutoff", _get(ev, "evaluate", "burden_cutoff"), float, 0, 1),
            max_error_tiles=_number("evaluate.max_error_tiles", _get(ev, "evaluate", "max_error_tiles"), int, 0, 500),
            gradcam_examples=_number("evaluate.gradcam_examples", _get(ev, "evaluate", "gradcam_examples"),
                                     int, 0, 50),
            gradcam_focus_images=_number("evaluate.gradcam_focus_images",
                                         _get(ev, "evaluate", "gradcam_focus_images"), int, 0),
        ),
        export=ExportParams(opset=_number("export.opset", _get(ex, "export", "opset"), int, MIN_OPSET, MAX_OPSET)),
        runtime=RuntimeParams(
            workers=_number("runtime.workers", _get(rt, "runtime", "workers"), int, 0),
            cache_features=_bool("runtime.cache_features", _get(rt, "runtime", "cache_features")),
            memory_budget_gb=_number("runtime.memory_budget_gb", _get(rt, "runtime", "memory_budget_gb"), float, 0),
            mixed_precision=_choice("runtime.mixed_precision", _get(rt, "runtime", "mixed_precision"),
                                    ("auto", "float32", "mixed_bfloat16", "mixed_float16")),
            deterministic=deterministic,
            devices=devices,
        ),
    )


# Section dataclass by its annotation (annotations are strings under `from __future__ import annotations`).
_SECTIONS = {cls.__name__: cls for cls in (DataParams, IngestParams, PreprocessParams, AugmentParams, SplitParams,
                                           ModelParams, TrainParams, FinetuneParams, EvaluateParams, ExportParams,
                                           RuntimeParams)}


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate params.yaml; every stage and command goes through here."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found: run from the project root, or pass --params PATH.")
    return parse_params(read_yaml(path))


def as_dict(obj: Any) -> Any:
    """Params (or any section) as plain JSON-ready data, for reports and model metadata."""
    if is_dataclass(obj):
        return {f.name: as_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, dict):
        return {str(k): as_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [as_dict(v) for v in obj]
    return obj
