"""params.yaml: one loader, typed values, and a clear message naming the key for every bad value."""

from pathlib import Path

import pytest

from conftest import shipped_params_raw, shipped_params_text
from glomeruli.data.layout import SYNTHETIC_SITE_REGEX
from glomeruli.core.params import ParamsError, load_params, parse_params, read_yaml

ROOT = Path(__file__).resolve().parents[2]


def shipped() -> dict:
    return shipped_params_raw()


def test_shipped_params_are_the_gpu_defaults():
    params = parse_params(shipped_params_raw())
    assert params.preprocess.image_size == 300
    assert params.model.weights == "imagenet"
    assert params.augment.copies_per_class[1] > params.augment.copies_per_class[0]
    assert params.ingest.class_dirs == {"globally_sclerotic_glomeruli": 1, "non_globally_sclerotic_glomeruli": 0}


def test_exponent_without_dot_is_a_float(tmp_path):
    text = shipped_params_text().replace("lr: 1e-3", "lr: 1e-4").replace("lr: 1e-5", "lr: 5E-6")
    (tmp_path / "params.yaml").write_text(text)
    params = load_params(tmp_path / "params.yaml")
    assert params.train_frozen.lr == pytest.approx(1e-4) and isinstance(params.train_frozen.lr, float)
    assert params.finetune.lr == pytest.approx(5e-6)


@pytest.mark.parametrize("section, key, value, message", [
    ("split", "val_fraction", 0.9, "split.val_fraction"),
    ("split", "folds", 1, "split.folds"),
    ("split", "fold", 7, "split.fold"),
    ("finetune", "unfreeze_blocks", "some", "finetune.unfreeze_blocks"),
    ("finetune", "lr_schedule", "linear", "finetune.lr_schedule"),
    ("evaluate", "calibration", "platt", "evaluate.calibration"),
    ("runtime", "devices", 0, "runtime.devices"),
    ("runtime", "deterministic", "yes", "runtime.deterministic"),
    ("split", "group_by", "patient", "split.group_by"),
    ("preprocess", "image_size", 16, "preprocess.image_size"),
    ("preprocess", "fill", [0, 0], "preprocess.fill"),
    ("train_frozen", "epochs", -1, "train_frozen.epochs"),
    ("train_frozen", "lr", "fast", "train_frozen.lr"),
    ("train_frozen", "batch_size", 2.5, "train_frozen.batch_size"),
    ("finetune", "unfreeze_blocks", 8, "finetune.unfreeze_blocks"),
    ("finetune", "class_weight", "auto", "finetune.class_weight"),
    ("model", "weights", "no/such/weights.h5", "model.weights"),
    ("runtime", "mixed_precision", "fp8", "runtime.mixed_precision"),
    ("runtime", "cache_features", "yes", "runtime.cache_features"),
    ("ingest", "group_regex", "([a-z", "ingest.group_regex"),
    ("ingest", "group_regex", "^(.+)_PAS_", "ingest.group_regex"),
    ("ingest", "site_regex", "([a-z", "ingest.site_regex"),
    ("ingest", "site_regex", "^(.+)_B", "ingest.site_regex"),  # no (?P<site>...)
    ("ingest", "site_regex", "^(?P<group>.+)_B", "ingest.site_regex"),
    ("ingest", "site_regex", 3, "ingest.site_regex"),
    ("ingest", "class_dirs", {"a": 1, "b": 1}, "ingest.class_dirs"),
    ("augment", "copies_per_class", {"1": 3}, "augment.copies_per_class"),
    ("augment", "scale", [1.2, 0.8], "augment.scale"),
    ("evaluate", "threshold_rule", "best", "evaluate.threshold_rule"),
])
def test_bad_values_name_key_value_and_allowed(section, key, value, message):
    raw = shipped()
    raw[section][key] = value
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert message in str(err.value)
    assert repr(value) in str(err.value) or str(value) in str(err.value)


def test_finetune_epochs_may_be_zero_but_train_frozen_epochs_may_not():
    raw = shipped()
    raw["finetune"]["epochs"] = 0  # no fine-tuning: the frozen-phase model is the model
    assert parse_params(raw).finetune.epochs == 0
    for section, epochs in (("finetune", -1), ("train_frozen", 0)):
        raw = shipped()
        raw[section]["epochs"] = epochs
        with pytest.raises(ParamsError, match=f"{section}.epochs"):
            parse_params(raw)


def test_site_regex_null_is_one_site_and_a_regex_is_kept():
    raw = shipped()
    assert parse_params(raw).ingest.site_regex is None  # CMIL: one site
    raw["ingest"]["site_regex"] = SYNTHETIC_SITE_REGEX
    assert parse_params(raw).ingest.site_regex == r"^SYNTH-(?P<site>SITE\d+)_"
    assert SYNTHETIC_SITE_REGEX in shipped_params_text()  # params.yaml's comment gives the synthetic sites' regex


def test_bad_site_regex_message_is_one_line():
    raw = shipped()
    raw["ingest"]["site_regex"] = "^(.+)_B"
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert str(err.value) == ("params.yaml: `ingest.site_regex` = '^(.+)_B' is invalid: needs a named group "
                              "(?P<site>...), or null for one site.")


def test_missing_key_and_missing_file(tmp_path):
    raw = shipped()
    del raw["finetune"]["lr"]
    with pytest.raises(ParamsError, match=r"`finetune.lr` is missing"):
        parse_params(raw)
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")


def test_weights_may_be_an_existing_file(tmp_path):
    weights = tmp_path / "b3.weights.h5"
    weights.write_bytes(b"x")
    raw = shipped()
    raw["model"]["weights"] = str(weights)
    assert parse_params(raw).model.weights == str(weights)


@pytest.mark.parametrize("section, key, suggestion", [
    ("train_frozen", "epocs", "train_frozen.epochs"),
    ("finetune", "unfreeze_block", "finetune.unfreeze_blocks"),
    ("runtime", "worker", "runtime.workers"),
])
def test_misspelt_key_is_refused_naming_the_nearest(section, key, suggestion):
    raw = shipped()
    raw[section][key] = 3
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    message = str(err.value)
    assert f"unknown key `{section}.{key}`" in message and f"did you mean `{suggestion}`" in message
    assert "\n" not in message


def test_unknown_section_is_refused_and_free_form_maps_are_not_checked():
    raw = shipped()
    raw["trian_frozen"] = {"epochs": 3}
    with pytest.raises(ParamsError, match=r"unknown key `trian_frozen`: did you mean `train_frozen`"):
        parse_params(raw)
    raw = shipped()
    raw["ingest"]["class_dirs"] = {"GS": 1, "nonGS": 0}  # the user's own folder names, not settings
    assert parse_params(raw).ingest.class_dirs == {"GS": 1, "nonGS": 0}
