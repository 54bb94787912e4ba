"""One thin script per DVC stage. dvc.yaml runs them as modules (`python -m stages.data`, or through
`python -m vlm.launch`), which puts the repository root first on sys.path: each stage imports this checkout's own
`vlm` package even where another checkout is the installed (editable) one, e.g. in `dvc exp run --temp` copies."""
