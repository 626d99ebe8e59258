"""Stage 1: list the raw dataset, check every image, write the manifest and the ingest report."""

from pathlib import Path

from glomeruli.core.atomic import atomic_path, write_json
from glomeruli.data.ingest import IngestConfig, check_ingest, ingest_dataset, write_manifest
from glomeruli.core.paths import INGEST_REPORT, MANIFEST
from glomeruli.core.stagekit import run_stage


def main(params):
    config = IngestConfig(class_dirs=params.ingest.class_dirs, labels_csv=params.ingest.labels_csv,
                          group_regex=params.ingest.group_regex, site_regex=params.ingest.site_regex,
                          max_pixels=params.ingest.max_pixels,
                          max_unreadable_fraction=params.ingest.max_unreadable_fraction,
                          workers=params.runtime.workers)
    result = ingest_dataset(Path(params.data.source), config)
    write_json(INGEST_REPORT, result.report)  # written even when the checks below fail: it says why
    check_ingest(result, config)
    with atomic_path(MANIFEST) as tmp:
        write_manifest(result.rows, tmp)


if __name__ == "__main__":
    run_stage("ingest", main)
