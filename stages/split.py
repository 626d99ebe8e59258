"""Stage 4: stratified split by source image or biopsy; an index into the augmented store, not copies."""

from glomeruli.core.atomic import write_json
from glomeruli.data.h5store import ImageStore
from glomeruli.core.paths import AUGMENTED, SPLIT, SPLIT_SUMMARY
from glomeruli.data.split import split_records, summarize
from glomeruli.core.stagekit import run_stage


def main(params):
    with ImageStore(AUGMENTED) as store:
        meta = store.meta
    split = split_records(meta, params.split, params.seed)
    write_json(SPLIT, {"store": str(AUGMENTED), "group_by": params.split.group_by, **split.to_json()})
    write_json(SPLIT_SUMMARY, summarize(meta, split, params.split))


if __name__ == "__main__":
    run_stage("split", main)
