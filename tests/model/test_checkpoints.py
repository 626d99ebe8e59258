"""Checkpoints (glomeruli.model.checkpoints): the resume key follows what shapes the run."""

from __future__ import annotations

from pathlib import Path

from glomeruli.model.checkpoints import checkpoint_dir


def test_resume_key_follows_the_store_content_not_its_size(tmp_path, monkeypatch):
    """Changed pixels in one source image: a store of the same size, other bytes, and another resume key."""
    from badfiles import rgba_png, write_clean_dataset
    from conftest import small_params
    from glomeruli.data.augment import augment_store
    from glomeruli.data.ingest import IngestConfig, ingest_dataset, write_manifest
    from glomeruli.core.paths import AUGMENTED, CHECKPOINTS, MANIFEST, PREPROCESSED, SPLIT
    from glomeruli.data.preprocess import preprocess_images

    monkeypatch.chdir(tmp_path)
    params = small_params(**{"preprocess.image_size": 32})
    files = write_clean_dataset(tmp_path / "raw")
    config = IngestConfig(class_dirs=params.ingest.class_dirs, labels_csv=None, group_regex=params.ingest.group_regex,
                          max_pixels=params.ingest.max_pixels, max_unreadable_fraction=0.0, workers=1)

    builds = iter(range(3))

    def build_store() -> tuple[Path, bytes]:
        for path in (MANIFEST, AUGMENTED):
            path.parent.mkdir(parents=True, exist_ok=True)
        rows = ingest_dataset(tmp_path / "raw", config).rows
        write_manifest(rows, MANIFEST)
        # a new preprocessed file each time: a one-worker augment keeps its input open in this process
        preprocessed = PREPROCESSED.with_name(f"preprocessed-{next(builds)}.h5")
        preprocess_images(tmp_path / "raw", rows, preprocessed, size=32, fill=(0, 0, 0), max_pixels=10**6, workers=1)
        augment_store(preprocessed, AUGMENTED, params.augment, seed=params.seed, workers=1)
        SPLIT.write_text('{"same": "split"}\n')
        return checkpoint_dir("train_frozen", params, CHECKPOINTS, split=SPLIT, manifest=MANIFEST), AUGMENTED.read_bytes()

    key, store = build_store()
    assert build_store() == (key, store)  # same inputs: same store, same key
    first = next(iter(files))
    (tmp_path / "raw" / first).write_bytes(rgba_png(20, 26, seed=4242))  # same size, other pixels
    changed_key, changed_store = build_store()
    assert len(changed_store) == len(store) and changed_store != store
    assert changed_key != key


def test_resume_key_hashes_the_code_dvc_yaml_lists(monkeypatch):
    """The code in the resume key is the code DVC reruns the stage for: the phase's own deps in dvc.yaml, and
    those of preprocess and augment for the store's content; inference.py (the caches) among them."""
    import yaml

    from conftest import small_params
    from glomeruli.model import checkpoints

    root = Path(__file__).resolve().parents[2]
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    for phase in ("train_frozen", "finetune"):
        hashed: list[Path] = []
        monkeypatch.setattr(checkpoints, "file_sha256", lambda path: hashed.append(Path(path).resolve()) or "0")
        checkpoints.checkpoint_dir(phase, small_params(), Path("checkpoints"), split=Path("split.json"),
                                   manifest=Path("manifest.csv"), start_model=Path("frozen.keras"))
        declared = {root / d for s in (phase, "preprocess", "augment") for d in stages[s]["deps"] if d.endswith(".py")}
        assert {p for p in hashed if p.suffix == ".py"} == declared
        assert root / "src/glomeruli/model/inference.py" in declared
