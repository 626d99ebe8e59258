#!/usr/bin/env bash
# The main job on a CPU, offline: synthetic sample data (data/sample) through all seven stages in minutes.
# params.yaml holds the GPU defaults (B3 at 300x300, ImageNet weights); `glomeruli demo` applies the CPU-sized
# overrides with `dvc exp run -S`, visibly (git diff params.yaml, dvc exp show). `glomeruli use-data` undoes it.
# Extra arguments go to `glomeruli demo` (e.g. -n 60 -S preprocess.image_size=32 for a smoke run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
export DVC_NO_ANALYTICS=1 TF_CPP_MIN_LOG_LEVEL=2
# dvc exp records experiments as git commits: give git an identity if the machine has none.
git config user.email >/dev/null || export GIT_AUTHOR_NAME=glomeruli-demo GIT_AUTHOR_EMAIL=demo@localhost \
  GIT_COMMITTER_NAME=glomeruli-demo GIT_COMMITTER_EMAIL=demo@localhost

glomeruli demo "$@"

echo
echo "Done. Test-set metrics:   metrics/evaluate.json   (dvc metrics show)"
echo "Plots (PNG + CSV):        metrics/plots/          (dvc plots show  -> dvc_plots/index.html)"
echo "Training curves:          metrics/train_frozen/ metrics/finetune/"
echo "Model + threshold:        models/model.keras models/model.meta.json"
echo "Model card:               models/MODEL_CARD.md (what it is for, its data, numbers and limits)"
echo "CPU overrides applied:    git diff params.yaml"
echo "Sample data:              data/sample (tracked by DVC; it and the run's lock and metrics are staged, so"
echo "                          queued experiments work: dvc exp run --queue -S evaluate.threshold_rule=youden)"
echo "Your own data next:       unzip it into data/raw, then: glomeruli use-data data/raw"
echo
python - <<'PY'
import json
m = json.load(open("metrics/evaluate.json"))
ci = m.get("test_ci95", {})
print(f"Test set ({m['test']['n']} images, {m.get('bootstrap', {}).get('units', '?')} biopsies), threshold "
      f"{m['threshold']:.3f} chosen on validation; 95 % intervals resampling whole biopsies:")
for key in ("balanced_accuracy", "f1", "roc_auc", "pr_auc", "precision", "recall"):
    low_high = f"  ({ci[key]['low']:.3f}-{ci[key]['high']:.3f})" if key in ci else ""
    print(f"  {key:<18} {m['test'][key]:.3f}{low_high}")
if "burden" in m:
    b = m["burden"]
    print(f"  per-biopsy % sclerotic: mean abs. error {b['mae_pct_points']:.1f} points, "
          f"{b['wrong_side_of_cutoff']} of {b['n_biopsies']} biopsies on the wrong side of {b['cutoff_pct']:.0f} %")
PY
