"""`glomeruli review`, the pull-request workflows and a DVC remote round trip, on the real tiny pipeline.

One module fixture builds the two revisions every test reviews: the session's finished `pipeline_repo`
(base, with its raw images tracked by DVC so a fresh clone can pull them) and a commit that changes only
`evaluate.*` params (head: only `evaluate` reruns).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from project import ROOT, STAGES, clone_project, dvc, glomeruli, run, set_params, stages_run

HEADLINE = {"Balanced accuracy": "balanced_accuracy", "F1": "f1", "ROC-AUC": "roc_auc", "PR-AUC": "pr_auc",
            "Precision": "precision", "Recall": "recall", "Accuracy": "accuracy", "Threshold": None}


def _git_json(repo: Path, rev: str, path: str) -> dict:
    return json.loads(run(repo, "git", "show", f"{rev}:{path}").stdout)


def _sha(repo: Path, rev: str) -> str:
    return run(repo, "git", "rev-parse", rev).stdout.strip()


@pytest.fixture(scope="module")
def revisions(pipeline_repo, tmp_path_factory):
    """(work clone, base sha, head sha, first-commit sha): head = base with a fixed threshold far from the one
    chosen on validation, so the threshold and the metrics change."""
    repo = clone_project(pipeline_repo, tmp_path_factory.mktemp("review") / "work")
    dvc(repo, "add", "-q", "data/raw")  # the images travel through the remote too: a fresh clone has none
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "track the raw images with DVC")
    base = _sha(repo, "HEAD")
    chosen = json.loads((repo / "metrics" / "evaluate.json").read_text())["threshold"]
    set_params(repo, evaluate__threshold_rule="fixed", evaluate__fixed_threshold=0.25 if chosen > 0.5 else 0.75)
    output = dvc(repo, "repro").stdout
    assert stages_run(output) == ["evaluate", "export"], output[-2000:]  # export ships the new model.meta.json
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "fixed threshold")
    first = run(repo, "git", "rev-list", "--max-parents=0", "HEAD").stdout.strip()
    return repo, base, _sha(repo, "HEAD"), first


def _rows(report: str) -> dict[str, list[str]]:
    """Table rows of the markdown report by their first cell."""
    rows = {}
    for line in report.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows.setdefault(cells[0], cells[1:])
    return rows


def _cell(metrics: dict, name: str | None) -> str:
    """What the report must show for one revision: the value, with evaluate's 95 % interval where it has one."""
    value = metrics["threshold"] if name is None else metrics["test"][name]
    ci = metrics.get("test_ci95", {}).get(name or "")
    return f"{value:.3f}" + (f" ({ci['low']:.3f}–{ci['high']:.3f})" if ci else "")


def _pictures(folder: Path, report: str) -> list[Path]:
    names = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report)
    assert names, report
    return [folder / name for name in names]


def _check_picture(path: Path, *revisions: str) -> None:
    """A readable PNG whose metadata names every revision that was drawn in it."""
    assert path.is_file(), path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 400 and image.height >= 300
        drawn = image.text["Description"]
        assert len(image.convert("L").getcolors(maxcolors=1 << 16) or range(999)) > 20  # not a blank canvas
    for rev in revisions:
        assert rev in drawn, (path.name, drawn)


def test_review_of_two_revisions(revisions, tmp_path):
    repo, base, head, _ = revisions
    out = tmp_path / "review"
    glomeruli(repo, "review", base, head, "-o", str(out))
    report = (out / "report.md").read_text()
    old, new = _git_json(repo, base, "metrics/evaluate.json"), _git_json(repo, head, "metrics/evaluate.json")
    assert abs(old["threshold"] - new["threshold"]) > 0.2
    rows = _rows(report)
    for label, name in HEADLINE.items():
        b, h = (old["threshold"], new["threshold"]) if name is None else (old["test"][name], new["test"][name])
        cells = rows[label]
        assert cells[0] == _cell(old, name) and cells[1] == _cell(new, name), (label, cells)
        same = abs(h - b) < 1e-9
        assert cells[2] == ("=" if same else f"{h - b:+.3f}"), (label, cells)
        expected_mark = "" if name is None or same else ("✅ better" if h > b else "❌ worse")
        assert cells[3] == expected_mark, (label, cells)
    assert rows["`evaluate.threshold_rule`"] == ["`max_f1`", "`fixed`"]
    fixed = yaml.safe_load(run(repo, "git", "show", f"{head}:params.yaml").stdout)["evaluate"]["fixed_threshold"]
    assert rows["`evaluate.fixed_threshold`"] == ["`0.5`", f"`{fixed}`"]
    assert "**Stages rerun:** `evaluate` (params `evaluate.fixed_threshold`, `evaluate.threshold_rule`)" in report
    assert "; `export` (deps `models/model.meta.json`)." in report
    for stage in STAGES[:STAGES.index("evaluate")]:
        assert f"`{stage}`" in report.split("**Unchanged:**")[1].splitlines()[0]
    # the rest is collapsed: split counts, validation and both training phases
    details = report.split("<details>")[1]
    for text in ("metrics/split.json", "`val.f1`", "metrics/train_frozen/metrics.json",
                 "metrics/finetune/metrics.json"):
        assert text in details and text not in report.split("<details>")[0]
    pictures = _pictures(out, report)
    assert {p.name for p in pictures} == {"confusion.png", "roc_pr.png", "training_curves.png"}
    for picture in pictures:
        _check_picture(picture, f"base {base[:7]}", f"head {head[:7]}")
    assert (out / "dvc_plots" / "index.html").is_file()
    # the model card: the head's copied beside the report and linked, its changed lines (the threshold) shown
    card = report.split("### Model card", 1)[1].split("<details>", 1)[0]
    assert "[`models/MODEL_CARD.md`](MODEL_CARD.md) of the head; its changed lines" in card
    assert (out / "MODEL_CARD.md").read_text() == run(repo, "git", "show", f"{head}:models/MODEL_CARD.md").stdout
    changed = card.splitlines()
    assert f"-**{old['threshold']:.4f}** on the calibrated probability (`evaluate.threshold_rule: max_f1`)" in \
        "\n".join(changed) and any(line.startswith(f"+**{new['threshold']:.4f}** on the calibrated probability "
                                                    "(`evaluate.threshold_rule: fixed`)") for line in changed)
    assert not any(line.startswith(("+# Model card", "-# Model card")) for line in changed)  # changed lines only
    comment = (out / "comment.md").read_text()
    assert comment.startswith("<!-- glomeruli-review -->\n") and "@ARTIFACT_URL@" in comment
    assert "![" not in comment and _rows(comment)["F1"] == rows["F1"]


def test_first_pull_request_shows_the_head_alone(revisions, tmp_path):
    repo, _, head, first = revisions  # the first commit has the pipeline but no dvc.lock or metrics
    out = tmp_path / "review"
    glomeruli(repo, "review", first, head, "-o", str(out))
    report = (out / "report.md").read_text()
    assert "has no metrics yet" in report
    new = _git_json(repo, head, "metrics/evaluate.json")
    rows = _rows(report)
    assert rows["F1"] == [_cell(new, "f1")] and rows["Threshold"] == [_cell(new, None)]
    assert "first run of the pipeline" in report
    assert "[`models/MODEL_CARD.md`](MODEL_CARD.md) of the head: new in this revision (the base has none)." in report
    for picture in _pictures(out, report):
        _check_picture(picture, f"head {head[:7]}")
        assert "base" not in Image.open(picture).text["Description"]


def test_review_refuses_unknown_or_foreign_revisions(revisions, tmp_path):
    repo = revisions[0]
    result = glomeruli(repo, "review", "no-such-branch", "-o", str(tmp_path / "r"), check=False)
    assert result.returncode == 1
    assert "unknown revision 'no-such-branch'" in result.stderr and "Traceback" not in result.stderr
    empty_tree = run(repo, "git", "hash-object", "-t", "tree", "/dev/null").stdout.strip()
    foreign = run(repo, "git", "commit-tree", empty_tree, "-m", "no pipeline here").stdout.strip()
    result = glomeruli(repo, "review", foreign, "-o", str(tmp_path / "r"), check=False)
    assert result.returncode == 1 and "has no dvc.yaml" in result.stderr, result.stderr
    assert not (tmp_path / "r" / "report.md").exists()


def test_remote_round_trip_fresh_clone_reviews_with_every_plot(revisions, tmp_path):
    repo, base, head, _ = revisions
    remote = tmp_path / "remote"
    dvc(repo, "remote", "add", "-d", "--local", "shared", str(remote))
    dvc(repo, "push", "-q", "--run-cache", "--all-commits")  # as each revision's author did after running it
    fresh = tmp_path / "fresh"
    run(tmp_path, "git", "clone", "-q", str(repo), str(fresh))
    # as CI does: the remote named by a secret, written to the git-ignored .dvc/config.local
    run(fresh, "bash", str(ROOT / "scripts" / "ci-remote.sh"), DVC_REMOTE_URL=str(remote), PYTHON=sys.executable)
    # nothing pulled yet: DVC fetches both revisions' cached curves from the remote on demand
    out = tmp_path / "before-pull"
    glomeruli(fresh, "review", base, head, "-o", str(out))
    report = (out / "report.md").read_text()
    assert "⚠️" not in report, report
    for picture in _pictures(out, report):
        _check_picture(picture, f"base {base[:7]}", f"head {head[:7]}")

    dvc(fresh, "pull", "-q", "--run-cache")
    assert (fresh / "metrics" / "finetune" / "plots" / "metrics" / "val" / "loss.tsv").is_file()
    status = dvc(fresh, "status").stdout
    assert "up to date" in status, status
    assert stages_run(dvc(fresh, "repro").stdout) == []
    out = tmp_path / "after-pull"
    glomeruli(fresh, "review", base, "-o", str(out))
    report = (out / "report.md").read_text()
    assert "⚠️" not in report, report
    assert {p.name for p in _pictures(out, report)} == {"confusion.png", "roc_pr.png", "training_curves.png"}
    for picture in _pictures(out, report):
        _check_picture(picture, f"base {base[:7]}", "head workspace")
    assert run(fresh, "git", "status", "--porcelain").stdout == ""  # the remote's config stays uncommitted


@pytest.mark.parametrize("workflow", sorted((ROOT / ".github" / "workflows").glob("*.yml")), ids=lambda p: p.name)
def test_workflows_pass_actionlint(workflow):
    actionlint = Path(sys.executable).parent / "actionlint"
    assert actionlint.is_file(), "actionlint missing: .venv/bin/pip install -r requirements-dev.txt"
    result = subprocess.run([str(actionlint), "-no-color", str(workflow)], capture_output=True, text=True,
                            env={"PATH": f"{actionlint.parent}:/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout + result.stderr


def test_both_workflows_exist():
    names = {p.name for p in (ROOT / ".github" / "workflows").glob("*.yml")}
    assert {"review.yml", "gpu-repro.yml"} <= names


def _workflow(name: str) -> dict:
    return yaml.safe_load((ROOT / ".github" / "workflows" / name).read_text())


def _expressions(value) -> str:
    """Every `${{ ... }}` expression anywhere in `value` (a step, an env mapping), as one text."""
    return " ".join(re.findall(r"\$\{\{(.*?)\}\}", yaml.safe_dump(value)))


STORAGE_SECRETS = ("DVC_REMOTE_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "GCP_CREDENTIALS_JSON", "DVC_SSH_KEY")


def test_gpu_repro_gives_each_secret_only_to_the_step_that_needs_it():
    """The branch's code runs on a runner that persists between runs: while it runs (`dvc repro`), neither the push
    token nor a storage key may be within its reach (environment, .git/config, a key file)."""
    workflow = _workflow("gpu-repro.yml")
    (job,) = workflow["jobs"].values()
    for env in (workflow.get("env", {}), job.get("env", {})):
        assert "secrets." not in _expressions(env) and "github.token" not in _expressions(env)
    steps = job["steps"]
    checkouts = [step for step in steps if str(step.get("uses", "")).startswith("actions/checkout@")]
    assert checkouts and all(step["with"]["persist-credentials"] is False for step in checkouts)
    assert all("secrets." not in _expressions(step) for step in checkouts)
    for step in steps:
        secrets = set(re.findall(r"secrets\.(\w+)", _expressions(step)))
        script = step.get("run", "")
        if re.search(r"\bgit\b.*\bpush\b", script):
            assert secrets == {"REPRO_PUSH_TOKEN"}, step
            assert "github.token" in _expressions(step["env"]) and "bin/dvc" not in script, step
            continue
        assert "github.token" not in _expressions(step), step
        if secrets:
            assert secrets <= set(STORAGE_SECRETS), step
            assert re.search(r"bin/dvc (pull|push)\b", script) and "bin/dvc repro" not in script, step
            assert "scripts/ci-remote.sh" in script, step  # which removes the keys and the remote when the step ends
    repro = [step for step in steps if "bin/dvc repro" in step.get("run", "")]
    assert len(repro) == 1 and "secrets." not in _expressions(repro[0])
    pulls = [step for step in steps if re.search(r"bin/dvc (pull|push)\b", step.get("run", ""))]
    assert len(pulls) == 2 and all(set(STORAGE_SECRETS) <= set(step["env"]) for step in pulls)


FAKE_PYTHON = """#!/bin/bash
# stands in for the venv's python: records each call (`-m dvc remote ...`, `-m pip install ...`), does nothing
printf '%s\\n' "$*" >> "$CALLS"
"""


def test_ci_remote_leaves_no_key_or_remote_behind(tmp_path):
    """`scripts/ci-remote.sh COMMAND...` sets the remote and its key files up for COMMAND alone."""
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    runner_temp = tmp_path / "runner-temp"
    runner_temp.mkdir()
    calls = tmp_path / "calls.log"
    secrets = dict(PYTHON=str(python), CALLS=str(calls), DVC_REMOTE_URL="ssh://host/store",
                   DVC_SSH_KEY="-----BEGIN KEY-----", RUNNER_TEMP=str(runner_temp))
    script = str(ROOT / "scripts" / "ci-remote.sh")
    seen = run(tmp_path, "bash", script, "bash", "-c", 'cat "$(find "$RUNNER_TEMP" -type f)"', **secrets).stdout
    assert "-----BEGIN KEY-----" in seen  # there while the command runs
    assert list(runner_temp.iterdir()) == []
    log = calls.read_text().splitlines()
    assert "-m dvc remote add --local --force --default ci ssh://host/store" in log
    assert any(line.startswith("-m dvc remote modify --local ci keyfile ") for line in log)
    assert log[-1] == "-m dvc remote remove --local ci"
    calls.unlink()
    failed = run(tmp_path, "bash", script, "false", check=False, **secrets)
    assert failed.returncode == 1 and list(runner_temp.iterdir()) == []
    assert calls.read_text().splitlines()[-1] == "-m dvc remote remove --local ci"


def test_review_updates_only_its_own_bots_comment(tmp_path):
    """Anyone can write the invisible marker into a comment first; only the workflow's bot's comment is updated."""
    (job,) = _workflow("review.yml")["jobs"].values()
    (step,) = [step for step in job["steps"] if "PATCH" in step.get("run", "")]
    select = step["env"]["OWN_COMMENT"]
    assert '.user.login == "github-actions[bot]"' in select and f'"$OWN_COMMENT"' in step["run"]
    marker = "<!-- glomeruli-review -->"
    pages = [[{"id": 1, "user": {"login": "mallory"}, "body": f"{marker}\nfake review"},
              {"id": 2, "user": {"login": "github-actions[bot]"}, "body": "another bot comment"}],
             [{"id": 3, "user": {"login": "github-actions[bot]"}, "body": f"{marker}\nthe review"}]]
    jq = shutil.which("jq")
    if jq is None:
        pytest.skip("jq not installed (GitHub's runners have it)")
    chosen = subprocess.run([jq, "-r", "--arg", "marker", marker, select], capture_output=True, text=True, check=True,
                            input="".join(json.dumps(page) for page in pages))  # `gh api --paginate` prints pages
    assert chosen.stdout.split() == ["3"]


def test_report_puts_intervals_beside_the_headline_and_knows_each_direction():
    """Evaluate's intervals, calibration and burden (issue 10's keys), rendered without a pipeline."""
    from glomeruli.commands.review import Change, Review, Revision, render_report

    values = [("test.f1", 0.5, 0.6), ("test_ci95.f1.low", 0.3, 0.45), ("test_ci95.f1.high", 0.7, 0.75),
              ("threshold", 0.4, 0.4), ("test.loss", 0.4, 0.3), ("calibration.brier", 0.2, 0.15),
              ("calibration.ece", 0.05, 0.08), ("calibration.temperature", 1.0, 1.3), ("burden.mae_pct_points", 4.0, 5.5),
              ("burden.wrong_side_of_cutoff", 2, 1), ("burden.n_biopsies", 9, 9), ("val.recall", 0.9, 0.8),
              ("calibration.brier_ci95.low", 0.1, 0.1), ("calibration.brier_ci95.high", 0.3, 0.2),
              ("val.roc_auc", 0.968, 0.968 + 1e-16)]
    evaluate = {key: Change(key, base, head) for key, base, head in values}
    review = Review(Revision("main", "a" * 40), Revision("workspace"), True, {"metrics/evaluate.json": evaluate},
                    [], [], [])
    report = render_report(review)
    headline, details = report.split("<details>")
    rows = _rows(headline)
    assert rows["F1"] == ["0.500 (0.300–0.700)", "0.600 (0.450–0.750)", "+0.100", "✅ better"]
    assert rows["Threshold"] == ["0.400", "0.400", "=", ""]
    assert rows["ROC-AUC"] == ["—", "—", "=", ""]  # not in this evaluate.json
    rows = _rows(details)
    assert rows["`test.loss`"][2:] == ["-0.100", "✅ better"]
    assert rows["`calibration.brier`"] == ["0.200 (0.100–0.300)", "0.150 (0.100–0.200)", "-0.050", "✅ better"]
    assert rows["`val.roc_auc`"][2:] == ["=", ""]  # floating-point noise is no change
    assert rows["`calibration.ece`"][2:] == ["+0.030", "❌ worse"]
    assert rows["`calibration.temperature`"][2:] == ["+0.300", ""]
    assert rows["`burden.mae_pct_points`"][2:] == ["+1.500", "❌ worse"]
    assert rows["`burden.wrong_side_of_cutoff`"][2:] == ["-1", "✅ better"]
    assert rows["`burden.n_biopsies`"][2:] == ["=", ""]
    assert rows["`val.recall`"][2:] == ["-0.100", "❌ worse"]
    assert "ci95" not in report  # every interval sits beside its number
