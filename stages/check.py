"""DVC stage `check`: do the params fit the data? Between `data` and `embed`, so that a recipe that cannot work on
the data stops in seconds, naming the param and the fix, before any image is embedded (vlm/data/checks.py).

metrics/check.json counts, per split, the images with captions, questions and regions; `embed` lists it as a dep
only to run after this stage (it changes only when the data does).
"""

from vlm.artifacts import DATASET_DIR, METRICS_DIR, SPLITS, write_json
from vlm.config import load_params
from vlm.data.checks import check_params, raise_on_fatal, summarize_split, summary_metrics
from vlm.stage_main import run_stage


def main() -> None:
    params = load_params()
    splits = {split: summarize_split(DATASET_DIR / f"{split}.parquet") for split in SPLITS}
    raise_on_fatal(check_params(params, splits))
    write_json(METRICS_DIR / "check.json", summary_metrics(splits))
    print("check: the params fit the data:", ", ".join(f"{split} {summary.to_dict()}" for split, summary
                                                        in splits.items()))


if __name__ == "__main__":
    run_stage(main)
