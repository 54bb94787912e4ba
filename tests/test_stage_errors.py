"""A failing stage prints its own message last (vlm/stage_main.py), and DVCLive's git repository is closed however
training ends (vlm/train/loop.py), so no dulwich tracebacks follow the message at interpreter shutdown."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vlm.stage_main import failure_report, is_user_error

REPO_ROOT = Path(__file__).resolve().parents[1]
SHUTDOWN_NOISE = ("dulwich", "Exception ignored", "sys.meta_path", "ResourceWarning")

# A training that fails inside the shared loop, after DVCLive opened the git repository: the loss is NaN at the
# first step, so the loop's NaN guard raises NonFiniteLossError, one of the project's own messages.
TRAIN_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    from vlm.config import TrainConfig
    from vlm.stage_main import run_stage
    from vlm.train.loop import train

    def main():
        weight = torch.nn.Parameter(torch.zeros(1))
        train([weight], lambda batch: {"loss": weight.sum() * float("nan")}, [0] * 4, 4,
              TrainConfig(precision="fp32", warmup_steps=1), log_dir=Path("dvclive/tiny"), description="tiny")

    if __name__ == "__main__":
        run_stage(main) if sys.argv[1:] == ["wrapped"] else main()
""")


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "VLM_TRACEBACK")}
    full.update(PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(command, cwd=cwd, env=full, capture_output=True, text=True, timeout=300)


def last_lines(stderr: str, count: int = 1) -> list[str]:
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-count:]


@pytest.fixture(scope="module")
def git_dvc_repo(tmp_path_factory) -> Path:
    """A git + DVC repository whose objects are packed, as in any real clone (dulwich keeps pack files open)."""
    repo = tmp_path_factory.mktemp("failing")
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "init"],
                    ["git", "gc", "-q"]):
        subprocess.run([Path(sys.executable).parent / command[0] if command[0] == "dvc" else command[0],
                        *command[1:]], cwd=repo, check=True, capture_output=True)
    assert list((repo / ".git" / "objects" / "pack").glob("*.pack"))
    (repo / "train_tiny.py").write_text(TRAIN_SCRIPT)
    return repo


def test_a_failing_training_stage_prints_its_own_message_last(git_dvc_repo: Path) -> None:
    result = run([sys.executable, "train_tiny.py", "wrapped"], git_dvc_repo)
    assert result.returncode == 1, result.stderr
    assert last_lines(result.stderr) == [
        "stage train_tiny failed: tiny: loss is not finite at step 0; lower the learning rate or check the inputs "
        "(no update was applied for this step)"]
    assert "Traceback" not in result.stderr  # a message of our own: no traceback
    assert not [word for word in SHUTDOWN_NOISE if word in result.stderr], result.stderr
    assert (git_dvc_repo / "dvclive" / "tiny").is_dir()  # DVCLive did open the repository


def test_even_an_uncaught_failure_leaves_no_git_files_open_at_shutdown(git_dvc_repo: Path) -> None:
    # Without the wrapper the traceback keeps the training's frames alive until shutdown; the loop closed the
    # repository DVCLive opened, so no dulwich object is left to complain then (-W: unclosed files would warn).
    result = run([sys.executable, "-W", "always::ResourceWarning", "train_tiny.py"], git_dvc_repo)
    assert result.returncode == 1
    assert "vlm.train.loop.NonFiniteLossError: tiny: loss is not finite at step 0" in result.stderr
    assert not [word for word in SHUTDOWN_NOISE if word in result.stderr], result.stderr


def test_a_stage_reports_a_bad_param_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("data:\n  resize: 5\n")
    result = run([sys.executable, "-m", "stages.data"], tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "stage data failed: param data.resize must be 0 (keep the original bytes) or >= 32 pixels, got 5"]


def test_unexpected_errors_keep_their_traceback() -> None:
    try:
        {}["missing"]
    except KeyError as exc:
        report = failure_report("embed", exc)
        assert not is_user_error(exc)
    assert report.startswith("Traceback (most recent call last):")
    assert report.rstrip().splitlines()[-1] == "stage embed failed: KeyError: 'missing'"
    try:
        int("x")  # a ValueError, but raised here, not by the project's code
    except ValueError as exc:
        assert not is_user_error(exc)
        assert "Traceback" in failure_report("data", exc)


def test_the_projects_own_errors_are_one_line_unless_a_traceback_is_asked_for(tmp_path: Path) -> None:
    from vlm.config import load_params

    try:
        load_params(tmp_path / "params.yaml")
    except ValueError as exc:
        assert is_user_error(exc)
        assert failure_report("weights", exc) == (f"stage weights failed: {tmp_path / 'params.yaml'}: params file "
                                                  "not found (run from the repository root)\n")
        with_trace = failure_report("weights", exc, traceback_wanted=True)
    assert with_trace.startswith("Traceback") and "vlm/config.py" in with_trace
    assert with_trace.rstrip().splitlines()[-1].startswith("stage weights failed: ParamsError: ")
