"""Counts VisionBackbone forward passes in every Python process started with this folder on PYTHONPATH.

Python imports `sitecustomize` at start-up. With $VLM_BENCH_BACKBONE_LOG set, the first import of
`vlm.models.backbone` wraps `VisionBackbone.forward` so that each call appends its batch size to that file: the
incremental benchmark (benchmarks/incremental.py) reads how many passes, and over how many images, each DVC
command's stages made, whichever stage made them. The project's code is not changed.
"""

import importlib.abc
import importlib.util
import os
import sys

LOG = os.environ.get("VLM_BENCH_BACKBONE_LOG")
MODULE = "vlm.models.backbone"


class _CountForwards(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != MODULE:
            return None
        sys.meta_path.remove(self)  # find the real module the usual way, once
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def execute_and_wrap(module):
            execute(module)
            forward = module.VisionBackbone.forward

            def counted(self, pixel_values):
                with open(LOG, "a") as log:
                    log.write(f"{len(pixel_values)}\n")
                return forward(self, pixel_values)

            module.VisionBackbone.forward = counted

        spec.loader.exec_module = execute_and_wrap
        return spec


if LOG:
    sys.meta_path.insert(0, _CountForwards())
