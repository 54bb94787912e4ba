"""Records which of the project's modules each Python process imported, for every process started with this
folder on PYTHONPATH (Python imports `sitecustomize` at start-up).

With $VLM_TEST_IMPORT_LOG set, a process appends one JSON line at exit: its command line and the files of the
`vlm` and `stages` modules it had loaded. The end-to-end test runs `dvc repro` so, and checks every stage's
imports against the deps dvc.yaml declares for it (tests/test_pipeline.py). The project's code is not changed.
"""

import atexit
import json
import os
import sys

LOG = os.environ.get("VLM_TEST_IMPORT_LOG")


def _write() -> None:
    files = sorted({os.path.relpath(module.__file__) for name, module in list(sys.modules.items())
                    if name.split(".")[0] in ("vlm", "stages") and getattr(module, "__file__", None)})
    with open(LOG, "a") as log:
        log.write(json.dumps({"argv": sys.argv, "files": files}) + "\n")


if LOG:
    atexit.register(_write)
