#!/usr/bin/env python
"""Benchmark: how close each part of the pipeline runs to its bare-library floor, on this machine.

    .venv/bin/python bench/run.py            # full run: 2,000 and 20,000 synthetic images (about 1 h on 2 cores)
    .venv/bin/python bench/run.py --quick    # small sizes, a few minutes: for development, not for RESULTS.md

Everything is measured side by side in one run and printed as a table of ratios with the targets of
issue 3 ("Fast and bounded"); bench/RESULTS.md records a full run. Not part of the test suite.

Each stage runs as its own process (the real stage scripts and package functions); peak memory is
the sum of the resident set sizes of its whole process tree (the stage and its workers), polled every
50 ms, so pages shared between a stage and its forked workers count once per process (an upper bound).

Work files go under --work (default /tmp/glomeruli-bench, about 35 GB for a full run): synthetic
datasets are generated once per (count, seed, size range) and reused by later runs; the full-size DVC
project is kept too, so a rerun only reruns the stages whose code or parameters changed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

from _common import ROOT, log  # first: puts src/ on sys.path

PY = sys.executable
GB = 1024**3
MB = 1024**2
SEED = 0
SIZE_RANGE = (250, 950)  # CMIL-sized RGBA PNGs


# ----------------------------------------------------------------------------------- helpers

def stage_env() -> dict:
    env = dict(os.environ)
    env.update(PATH=f"{Path(PY).parent}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(ROOT / "src"),
               DVC_NO_ANALYTICS="1", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    env.setdefault("GLOMERULI_LOG_LEVEL", "INFO")
    return env


@dataclass
class Measured:
    seconds: float
    peak_rss_tree: int = 0       # bytes: max over time of the sum of RSS over the process tree
    peak_pss_tree: int = 0       # bytes: same with proportional set size (shared pages split)
    max_rss_process: int = 0     # bytes: the largest single process seen
    processes: int = 0           # most processes seen at once
    samples: list = field(default_factory=list)


def run_measured(cmd: list[str], cwd: Path, log_path: Path, env: dict | None = None, poll_s: float | None = 0.05,
                 check: bool = True) -> Measured:
    """Run `cmd`, polling the memory of its whole process tree; returns wall time and peaks.

    poll_s=None: time only. Polling costs the machine about 3 % of a core per process watched, more for
    the side with more processes, so throughput comparisons are timed without it.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env or stage_env(), stdout=out, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        peak_rss = peak_pss = largest = most = 0
        while True:
            pid, status = os.waitpid(proc.pid, 0 if poll_s is None else os.WNOHANG)
            if pid:
                break
            rss = pss = 0
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                tree = []
            for p in tree:
                try:
                    info = p.memory_full_info()
                    rss, pss, largest = rss + info.rss, pss + info.pss, max(largest, info.rss)
                except psutil.Error:
                    pass
            peak_rss, peak_pss, most = max(peak_rss, rss), max(peak_pss, pss), max(most, len(tree))
            time.sleep(poll_s)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if check and proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}); log {log_path}:\n{tail}")
    return Measured(seconds, peak_rss, peak_pss, largest, most)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset(work: Path, n: int, seed: int = SEED, size_range: tuple[int, int] = SIZE_RANGE) -> Path:
    """A synthetic CMIL-layout dataset, generated once per arguments and reused."""
    from glomeruli import __version__
    from glomeruli.data.sample_data import generate_sample_dataset

    out = work / "data" / f"raw-n{n}-seed{seed}-{size_range[0]}-{size_range[1]}"
    done = out.with_name(out.name + ".done")
    if out.is_dir() and done.is_file():
        return out
    free = shutil.disk_usage(work).free
    need = n * 600_000
    if free < need * 1.2:
        raise SystemExit(f"{work}: {free / GB:.0f} GB free, {n} images need about {need / GB:.0f} GB")
    log(f"generating {n} synthetic images ({size_range[0]}-{size_range[1]} px) in {out} (cached for later runs)")
    start = time.perf_counter()
    generate_sample_dataset(out, n, seed=seed, size_range=size_range, workers=0, progress=False)
    done.write_text(json.dumps({"version": __version__, "seconds": time.perf_counter() - start}))
    return out


def evict_from_page_cache(folder: Path) -> None:
    """Drop `folder`'s files from the page cache, so that a timed pass reads them from the disk.

    At 20,000 images the raw PNGs (11 GB) and the stores written meanwhile outgrow the page cache, so
    whichever side ran second would otherwise find a different share of its files cached. Every timed
    pass of both sides starts from the same state: nothing cached.
    """
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def write_params(path: Path, overrides: dict) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        raw[section][name] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def machine() -> dict:
    model = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    from importlib.metadata import version

    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "ram_gb": round(psutil.virtual_memory().total / GB, 1),
            "python": platform.python_version(), "keras": version("keras"),
            "backend": os.environ.get("KERAS_BACKEND", "tensorflow (default)"),
            "tensorflow": _version("tensorflow-cpu") or _version("tensorflow"), "opencv": _version("opencv-python-headless"),
            "os": platform.platform(), "load_average_start": [round(x, 2) for x in os.getloadavg()]}


# ----------------------------------------------------------------------------------- sections

def bench_data(work: Path, sizes: tuple[int, int], workers: int, repeats: int, check_bytes: bool) -> dict:
    """Ingest, preprocess and augment at two dataset sizes: peak memory of each, and preprocess
    images/s against a bare OpenCV read + resize loop over the same files with the same workers."""
    results: dict = {"sizes": list(sizes), "workers": workers}
    for n in sizes:
        raw = dataset(work, n)
        proj = work / f"stages-n{n}"
        shutil.rmtree(proj, ignore_errors=True)
        proj.mkdir(parents=True)
        # Stain normalisation off: the rows compare decoding, fitting and storing with a bare OpenCV loop (Macenko
        # adds its own ~20 ms per 300 px image by design; README, Several hospitals).
        write_params(proj / "params.yaml", {"data.source": str(raw), "runtime.workers": workers,
                                            "preprocess.stain_normalization": "none"})
        row: dict = {}
        for stage in ("ingest", "preprocess", "augment"):
            log(f"n={n}: stage {stage}")
            evict_from_page_cache(raw)
            m = run_measured([PY, str(ROOT / "stages" / f"{stage}.py")], proj, proj / "logs" / f"{stage}.log")
            row[stage] = m.__dict__
            log(f"n={n}: {stage} {m.seconds:.1f}s, peak tree RSS {m.peak_rss_tree / MB:.0f} MB "
                f"(PSS {m.peak_pss_tree / MB:.0f} MB, largest process {m.max_rss_process / MB:.0f} MB)")
        row["records"] = _store_len(proj / "data/processed/augmented.h5")
        row["bytes"] = {p: (proj / p).stat().st_size for p in ("data/interim/preprocessed.h5",
                                                               "data/processed/augmented.h5")}
        # Throughput: the preprocess stage vs the bare loop, alternating. Both sides are timed as whole
        # processes (interpreter start and imports included), without memory polling, each pass from a
        # cold page cache; the stage's previous output is deleted first, as `dvc repro` does. The bare
        # loop's own timer is kept too.
        stage_s, bare_s, bare_loop_s = [], [], []
        passes = repeats if n == sizes[0] else min(repeats, 2)  # 20,000 images: about 3 min a pass
        for i in range(passes):
            log(f"n={n}: bare OpenCV read + resize loop ({i + 1}/{passes})")
            out = proj / f"bare-{i}.json"
            evict_from_page_cache(raw)
            bare = run_measured([PY, str(ROOT / "bench" / "_workloads.py"), "bare-read-resize",
                                 "--manifest", str(proj / "data/interim/manifest.csv"), "--source", str(raw),
                                 "--size", "300", "--workers", str(workers), "--out", str(out)],
                                proj, proj / "logs" / f"bare-{i}.log", poll_s=None)
            bare_s.append(bare.seconds)
            bare_loop_s.append(json.loads(out.read_text())["seconds"])
            log(f"n={n}: preprocess stage ({i + 1}/{passes})")
            evict_from_page_cache(raw)
            (proj / "data/interim/preprocessed.h5").unlink()
            m = run_measured([PY, str(ROOT / "stages" / "preprocess.py")], proj, proj / "logs" / "preprocess-again.log",
                             poll_s=None)
            stage_s.append(m.seconds)
        images = _manifest_len(proj / "data/interim/manifest.csv")
        row["preprocess_img_s"] = [images / s for s in stage_s]
        row["bare_img_s"] = [images / s for s in bare_s]
        row["bare_loop_img_s"] = [images / s for s in bare_loop_s]
        row["images"] = images
        log(f"n={n}: preprocess {max(row['preprocess_img_s']):.1f} img/s, bare {max(row['bare_img_s']):.1f} img/s")
        if check_bytes and n == sizes[0]:
            row["bytes_identical_workers_1"] = _check_worker_independence(proj, raw)
        if n != sizes[0]:
            shutil.rmtree(proj / "data", ignore_errors=True)  # tens of GB: not kept
        results[str(n)] = row
    return results


def _check_worker_independence(proj: Path, raw: Path) -> dict:
    """Rerun the data stages with one worker: every output must have the same bytes."""
    one = proj.with_name(proj.name + "-workers1")
    shutil.rmtree(one, ignore_errors=True)
    one.mkdir()
    write_params(one / "params.yaml", {"data.source": str(raw), "runtime.workers": 1})
    same = {}
    for stage, out in (("ingest", "data/interim/manifest.csv"), ("preprocess", "data/interim/preprocessed.h5"),
                       ("augment", "data/processed/augmented.h5")):
        log(f"byte check: {stage} with runtime.workers=1")
        run_measured([PY, str(ROOT / "stages" / f"{stage}.py")], one, one / "logs" / f"{stage}.log")
        same[stage] = sha256(one / out) == sha256(proj / out)
    shutil.rmtree(one, ignore_errors=True)
    return same


def _manifest_len(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f) - 1


def _store_len(path: Path) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        return int(f["images"].shape[0])


def bench_training(work: Path, quick: bool) -> dict:
    raw = dataset(work, 100 if quick else 300, seed=1)
    out = work / "training" / "result.json"
    shutil.rmtree(out.parent, ignore_errors=True)
    args = ["--size", "64" if quick else "128", "--fit-records", "256" if quick else "1024",
            "--fit-repeats", "1" if quick else "2", "--finetune-epochs", "3"]
    log("training: frozen phase cached/uncached, fine-tune cached/uncached, fit loop vs bare model.fit")
    m = run_measured([PY, str(ROOT / "bench" / "_workloads.py"), "training", "--raw", str(raw),
                      "--work", str(out.parent), "--out", str(out), *args], ROOT, work / "logs" / "training.log")
    result = json.loads(out.read_text())
    result["seconds"] = m.seconds
    return result


def bench_predict(work: Path, quick: bool, workers: int) -> dict:
    raw = dataset(work, 2000)
    n = 96 if quick else 256
    folder = work / f"predict-{n}"
    if not folder.is_dir():
        files = sorted((raw / "non_globally_sclerotic_glomeruli").glob("*.png"))[: n * 3 // 4]
        files += sorted((raw / "globally_sclerotic_glomeruli").glob("*.png"))[: n - len(files)]
        folder.mkdir(parents=True)
        for f in files:
            os.link(f, folder / f.name)
    out = work / "predict-result.json"
    log(f"prediction: {n} images at 300 px, glomeruli.commands.predict vs the bare forward pass")
    run_measured([PY, str(ROOT / "bench" / "_workloads.py"), "predict", "--images", str(folder), "--size", "300",
                  "--work", str(work / "predict-model"), "--workers", str(workers), "--out", str(out),
                  "--repeats", "2" if quick else "5"],
                 ROOT, work / "logs" / "predict.log")
    return json.loads(out.read_text())


DVC_FILES = ("dvc.yaml", "stages", "src", "pyproject.toml", ".dvcignore")


def bench_dvc(work: Path, n: int, image_size: int, repeats: int = 3) -> dict:
    """A real `dvc repro` of all seven stages on n images, then the time of a no-op `dvc repro`."""
    raw = dataset(work, n)
    repo = work / f"dvc-n{n}"
    env = stage_env()
    env.update(GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@localhost", GIT_COMMITTER_NAME="bench",
               GIT_COMMITTER_EMAIL="bench@localhost", GLOMERULI_LOG_LEVEL="INFO")

    def sh(*args, log_name=None) -> Measured:
        return run_measured(list(args), repo, work / "logs" / (log_name or f"dvc-{args[0]}.log"), env=env, poll_s=0.02)

    if not (repo / ".dvc").is_dir():
        shutil.rmtree(repo, ignore_errors=True)
        repo.mkdir(parents=True)
        sh("git", "init", "-q", "-b", "main")
        sh(PY, "-m", "dvc", "init", "-q")
        (repo / "data").mkdir()
        subprocess.run(["cp", "-al", str(raw), str(repo / "data" / "raw")], check=True)  # hard links: no copy
        (repo / ".gitignore").write_text("/data/raw/\n")
    for item in DVC_FILES:  # this checkout's current code; DVC reruns only what it changes
        src, dst = ROOT / item, repo / item
        if dst.is_dir():
            shutil.rmtree(dst)
        (shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
         if src.is_dir() else shutil.copy(src, dst))
    # CPU-sized training (the stages' cost, not DVC's, depends on these); the data are the full count.
    overrides = {"preprocess.image_size": image_size, "model.weights": "none", "runtime.workers": 0,
                 "train_frozen.epochs": 1, "train_frozen.batch_size": 64, "finetune.epochs": 1,
                 "finetune.batch_size": 64, "finetune.unfreeze_blocks": 1, "evaluate.batch_size": 64}
    write_params(repo / "params.yaml", overrides)
    sh("git", "add", "-A")
    sh("git", "commit", "-q", "--allow-empty", "-m", "bench")
    log(f"dvc: `dvc repro` of the full pipeline on {n} images (only what changed since the last run)")
    full = sh(PY, "-m", "dvc", "repro", log_name="dvc-repro-full.log")
    log(f"dvc: full repro took {full.seconds:.0f}s; now timing no-op `dvc repro` x{repeats}")
    sh("git", "add", "-A")
    sh("git", "commit", "-q", "--allow-empty", "-m", "bench lock")
    times, ran = [], []
    for i in range(repeats):
        m = sh("dvc", "repro", log_name=f"dvc-noop-{i}.log")
        text = (work / "logs" / f"dvc-noop-{i}.log").read_text()
        times.append(m.seconds)
        ran.append("Running stage" in text)
    status = subprocess.run(["dvc", "status"], cwd=repo, env=env, capture_output=True, text=True).stdout.strip()
    return {"images": n, "image_size": image_size, "overrides": overrides, "full_repro_s": full.seconds,
            "noop_s": times, "noop_ran_a_stage": any(ran), "dvc_status": status,
            "bytes": {str(p.relative_to(repo)): p.stat().st_size for p in sorted((repo / "data").rglob("*.h5"))}}


# ----------------------------------------------------------------------------------- table

def table(r: dict, quick: bool) -> list[dict]:
    rows = []

    def add(metric, value, target, ok, detail=""):
        rows.append({"metric": metric, "value": value, "target": target,
                     "pass": "n/a" if ok is None else ("PASS" if ok else "FAIL"), "detail": detail})

    d = r.get("data")
    if d:
        small, large = (str(s) for s in d["sizes"])
        for n in (small, large):
            dd = d[n]
            ratio = max(dd["preprocess_img_s"]) / max(dd["bare_img_s"])
            add(f"preprocess images/s vs bare OpenCV read+resize, {int(n):,} images", f"{ratio:.2f}", ">= 0.85",
                ratio >= 0.85, f"{max(dd['preprocess_img_s']):.1f} vs {max(dd['bare_img_s']):.1f} img/s, "
                f"best of {len(dd['preprocess_img_s'])} / {len(dd['bare_img_s'])} alternating passes, each from a cold "
                f"page cache, both timed as whole processes without memory polling (the bare loop's own timer: "
                f"{max(dd.get('bare_loop_img_s', [float('nan')])):.1f} img/s), workers={d['workers']} "
                f"(= {os.cpu_count()} cores), 300 px")
        for stage in ("ingest", "preprocess", "augment"):
            a, b = d[small][stage], d[large][stage]
            add(f"peak RSS {stage}, {int(large):,} images", f"{b['peak_rss_tree'] / MB:.0f} MB", "< 1024 MB",
                b["peak_rss_tree"] < GB, f"process tree; PSS {b['peak_pss_tree'] / MB:.0f} MB; largest process "
                f"{b['max_rss_process'] / MB:.0f} MB; {b['processes']} processes; {b['seconds']:.0f} s")
            growth = b["peak_rss_tree"] / a["peak_rss_tree"]
            add(f"peak RSS {stage}, {int(large):,} / {int(small):,} images", f"{growth:.2f}", "<= 1.20",
                growth <= 1.2, f"{a['peak_rss_tree'] / MB:.0f} MB at {int(small):,}")
        same = d[small].get("bytes_identical_workers_1")
        if same:
            add("data-stage outputs identical with 1 worker vs all cores", ", ".join(f"{k}: {'yes' if v else 'NO'}"
                for k, v in same.items()), "identical", all(same.values()), f"{int(small):,} images")
    t = r.get("training")
    if t:
        sizes = (f"B3 {t['image_size']} px, weights none, {t['train_records']} train / {t['val_records']} val "
                 f"records, batch {t['batch_size']}")
        ratio = t["frozen_5_epochs_s_uncached"] / t["frozen_5_epochs_s_cached"]
        add("frozen phase 5 epochs, uncached / cached wall time", f"{ratio:.1f}x", ">= 4x", ratio >= 4,
            f"{t['frozen_5_epochs_s_cached']:.1f} s vs {t['frozen_5_epochs_s_uncached']:.1f} s; {sizes}")
        ratio = t["finetune_epoch_s_uncached"] / t["finetune_epoch_s_cached"]
        add(f"fine-tune epoch time, uncached / cached ({t['unfreeze_blocks']} blocks)", f"{ratio:.1f}x", "report",
            None, f"{t['finetune_epoch_s_cached']:.2f} s vs {t['finetune_epoch_s_uncached']:.2f} s per epoch after "
            f"the first; whole phase ({len(t['finetune_epochs_cached'])} epochs, caching included) "
            f"{t['finetune_phase_s_cached']:.0f} s vs {t['finetune_phase_s_uncached']:.0f} s; {sizes}")
        for name, what in (("finetune_top", "fine-tune (top blocks on cached activations)"),
                           ("frozen_head", "frozen phase (head on cached features)")):
            ratio = t[f"{name}_ours_img_s"] / t[f"{name}_bare_img_s"]
            primary = name == "finetune_top"
            add(f"training images/s vs bare model.fit: {what}", f"{ratio:.2f}", ">= 0.95" if primary else "report",
                (ratio >= 0.95) if primary else None,
                f"{t[f'{name}_ours_img_s']:.0f} vs {t[f'{name}_bare_img_s']:.0f} img/s; {t['fit_records']} records "
                f"{tuple(t['fit_input_shape']) if primary else '(pooled features)'} + {2 * t['batch_size']} val, batch {t['batch_size']}; best "
                f"epoch (2nd to 4th, validation included) of {len(t[f'{name}_ours_epochs_s']) // 3} alternating fits each")
    dv = r.get("dvc")
    if dv:
        best = min(dv["noop_s"])
        add(f"no-op `dvc repro`, {dv['images']:,}-image project", f"{statistics.median(dv['noop_s']):.2f} s",
            "< 3 s", statistics.median(dv["noop_s"]) < 3 and not dv["noop_ran_a_stage"],
            f"runs {', '.join(f'{s:.2f}' for s in dv['noop_s'])} s; best {best:.2f} s; "
            f"no stage ran: {not dv['noop_ran_a_stage']}; data stages at {dv['image_size']} px")
    p = r.get("predict")
    if p:
        ours, bare = max(p["ours_img_s"]), max(p["bare_img_s"])
        whole = max(p["ours_total_img_s"]) / max(p["bare_total_img_s"])
        paired = statistics.median(o / b for o, b in zip(p["ours_img_s"], p["bare_img_s"]))
        add("prediction images/s vs bare forward pass", f"{ours / bare:.2f}", ">= 0.9", ours / bare >= 0.9,
            f"{ours:.2f} vs {bare:.2f} img/s after the first batch, best of {p['repeats']} alternating passes "
            f"(median of the paired ratios {paired:.2f}); "
            f"{p['images']} PNGs (decoded by glomeruli.commands.predict; beforehand, untimed, for the bare pass), "
            f"B3 {p['image_size']} px, batch {p['batch_size']}; whole calls incl. first batch, without model "
            f"load: {whole:.2f}")
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| metric | measured | target | result | details |", "|---|---|---|---|---|"]
    lines += [f"| {r['metric']} | {r['value']} | {r['target']} | {r['pass']} | {r['detail']} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (minutes); numbers are indicative only")
    parser.add_argument("--work", type=Path, default=Path("/tmp/glomeruli-bench"))
    parser.add_argument("--sections", default="data,training,predict,dvc",
                        help="comma-separated subset of data,training,predict,dvc")
    parser.add_argument("--workers", type=int, default=0, help="data-stage workers (0 = all cores)")
    parser.add_argument("--dvc-images", type=int, default=None, help="images in the DVC project (default 20,000)")
    parser.add_argument("--dvc-image-size", type=int, default=32,
                        help="preprocess.image_size of the DVC project (small enough to train on a CPU)")
    parser.add_argument("--table", type=Path, help="print the table of an earlier run's results JSON, and exit")
    args = parser.parse_args()
    if args.table:
        results = json.loads(args.table.read_text())
        print(markdown(table(results, results.get("quick", False))))
        return
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    sections = set(args.sections.split(","))
    started = dt.datetime.now().astimezone()
    results: dict = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "quick": args.quick,
                     "started": started.isoformat(timespec="seconds"), "machine": machine()}
    log(f"machine: {results['machine']}")
    stamp = started.strftime("%Y%m%d-%H%M%S")
    raw_path = work / f"results-{stamp}.json"

    def keep() -> None:  # after every section, so a failed or cut run keeps what it measured
        raw_path.write_text(json.dumps(results, indent=2, default=str))

    if "data" in sections:
        sizes = (200, 2000) if args.quick else (2000, 20000)
        results["data"] = bench_data(work, sizes, args.workers, repeats=1 if args.quick else 3,
                                     check_bytes=not args.quick)
        keep()
    if "training" in sections:
        results["training"] = bench_training(work, args.quick)
        keep()
    if "predict" in sections:
        results["predict"] = bench_predict(work, args.quick, args.workers)
        keep()
    if "dvc" in sections:
        results["dvc"] = bench_dvc(work, args.dvc_images or (2000 if args.quick else 20000), args.dvc_image_size)
        keep()
    results["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    results["minutes"] = round((dt.datetime.now().astimezone() - started).total_seconds() / 60, 1)
    keep()
    rows = table(results, args.quick)
    results["table"] = rows
    keep()
    md = markdown(rows)
    (work / f"results-{stamp}.md").write_text(md + "\n")
    print()
    print(f"machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, "
          f"{results['machine']['ram_gb']} GB RAM; load average {results['machine']['load_average_start']} at start, "
          f"{results['load_average_end']} at end; {results['minutes']} min{' (--quick)' if args.quick else ''}")
    print(md)
    print(f"\nraw results: {raw_path}")


if __name__ == "__main__":
    main()
