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
echo "CPU overrides applied:    git diff params.yaml"
echo "Sample data:              data/sample (tracked by DVC; it and the run's lock and metrics are staged, so"
echo "                          queued experiments work: dvc exp run --queue -S evaluate.threshold_rule=youden)"
echo "Your own data next:       unzip it into data/raw, then: glomeruli use-data data/raw"
dvc metrics show metrics/evaluate.json
