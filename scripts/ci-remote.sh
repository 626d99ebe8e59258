#!/usr/bin/env bash
# CI: make the DVC remote named in the repository's secrets the default remote of the checkout in the
# current folder. Everything goes into .dvc/config.local (git-ignored, never committed).
#   bash scripts/ci-remote.sh                  set it up and leave it (a runner thrown away after the job)
#   bash scripts/ci-remote.sh COMMAND ARGS...  set it up for COMMAND alone (e.g. `.venv/bin/dvc pull`): when
#                                              COMMAND ends, however it ends, the key files and the remote are
#                                              removed again, so that what the job runs next (a branch's
#                                              `dvc repro` on a self-hosted runner) cannot read them
#   DVC_REMOTE_URL        required: s3://..., gs://..., ssh://..., azure://..., or a folder path
#   GCP_CREDENTIALS_JSON  GCS: service-account key (written to a private temporary file)
#   DVC_SSH_KEY           SSH: private key (written to a private temporary file)
# S3 keys need no setup here: DVC reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY when it pulls or pushes.
set -euo pipefail
PYTHON=${PYTHON:-.venv/bin/python}
if [ -z "${DVC_REMOTE_URL:-}" ]; then
  echo "::error title=No DVC remote::set the repository secret DVC_REMOTE_URL (README: 'A DVC remote')" >&2
  exit 1
fi
case "$DVC_REMOTE_URL" in
  s3://*) plugin=s3 ;;
  gs://*) plugin=gs ;;
  ssh://*) plugin=ssh ;;
  azure://*) plugin=azure ;;
  *) plugin= ;;
esac
if [ -n "$plugin" ]; then  # the remote's DVC plugin, matching the pinned DVC
  "$PYTHON" -m pip install -q "dvc[$plugin]==$("$PYTHON" -c 'import dvc; print(dvc.__version__)')"
fi
secrets=$(mktemp -d "${RUNNER_TEMP:-${TMPDIR:-/tmp}}/dvc-remote.XXXXXX")
if [ $# -gt 0 ]; then
  forget() {
    rm -rf "$secrets"
    "$PYTHON" -m dvc remote remove --local ci > /dev/null 2>&1 || true
  }
  trap forget EXIT
fi
"$PYTHON" -m dvc remote add --local --force --default ci "$DVC_REMOTE_URL"
if [ -n "${GCP_CREDENTIALS_JSON:-}" ]; then
  install -m 600 /dev/null "$secrets/gcp-credentials.json"
  printf '%s' "$GCP_CREDENTIALS_JSON" > "$secrets/gcp-credentials.json"
  "$PYTHON" -m dvc remote modify --local ci credentialpath "$secrets/gcp-credentials.json"
fi
if [ -n "${DVC_SSH_KEY:-}" ]; then
  install -m 600 /dev/null "$secrets/dvc-ssh-key"
  printf '%s\n' "$DVC_SSH_KEY" > "$secrets/dvc-ssh-key"
  "$PYTHON" -m dvc remote modify --local ci keyfile "$secrets/dvc-ssh-key"
fi
echo "DVC remote 'ci' (default, local config): ${DVC_REMOTE_URL%%://*}"
if [ $# -gt 0 ]; then
  "$@"
fi
