"""Run the 2-rank suite (``tests/distributed``) under torchrun from a plain ``python -m pytest``,
so that one command runs every test, and make sure its failures reach this process.

torchrun exits non-zero when any rank exits non-zero, pytest exits 5 when it collected nothing,
and an all-skipped suite exits 0: each of those must fail here, not pass quietly. (Some skips
are fine, e.g. GPU-marked tests on a CPU machine, as long as every rank passed tests.)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests._helpers import launcher_free_env

REPO = Path(__file__).resolve().parents[2]
NPROC = 2
TIMEOUT_S = 900  # the suite takes well under a minute; a loaded 2-core machine may be far slower


def run_under_torchrun(test_path: str | Path, timeout_s: float = TIMEOUT_S) -> tuple[int, str]:
    """``torchrun --standalone --nproc_per_node=2 -m pytest test_path`` from the repo root;
    returns (exit code, stdout+stderr). On timeout the whole process group is killed."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={NPROC}",
        "-m",
        "pytest",
        str(test_path),
        "-q",
        "-p",
        "no:cacheprovider",
    ]
    env = launcher_free_env()
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks: they share the new session
        output, _ = proc.communicate()
        return -1, f"timed out after {timeout_s}s\n{output}"
    return proc.returncode, output


def distributed_failure(returncode: int, output: str) -> str | None:
    """Why a torchrun'd pytest run does not count as a pass, or None when every rank passed."""
    if returncode != 0:
        ranks = re.findall(r"exitcode\s*:\s*(-?\d+)", output)
        return (
            f"torchrun exited {returncode}; the ranks' exit codes {ranks} (pytest: 1 = tests "
            "failed, 2 = interrupted, 5 = no tests collected; negative = killed by that signal)"
        )
    passed = [int(n) for n in re.findall(r"\b(\d+) passed\b", output)]
    if len(passed) < NPROC or min(passed) == 0:
        return f"expected a pytest summary with passing tests from each of {NPROC} ranks, found {passed}"
    if re.search(r"\b\d+ (failed|errors?)\b", output):
        return "some ranks report failed or erroring tests"
    return None


def test_distributed_suite_passes_under_torchrun():
    returncode, output = run_under_torchrun("tests/distributed")
    failure = distributed_failure(returncode, output)
    assert failure is None, f"{failure}\n--- torchrun output ---\n{output}"


@pytest.mark.parametrize(
    "name, body",
    [
        (
            "fails_on_rank_1",
            "import os\n\ndef test_rank():\n    assert os.environ['RANK'] == '0'\n",
        ),
        ("collects_nothing", "def helper():\n    pass\n"),
        ("skips_everything", "import pytest\n\ndef test_skip():\n    pytest.skip('nothing ran')\n"),
    ],
)
def test_a_distributed_run_that_does_not_pass_is_reported(tmp_path, name, body):
    """The runner above must not turn a rank's failure, an empty collection (pytest exit 5) or
    an all-skipped run into a pass."""
    (tmp_path / f"test_{name}.py").write_text(body)
    returncode, output = run_under_torchrun(tmp_path, timeout_s=300)
    assert distributed_failure(returncode, output) is not None, output
    if name == "collects_nothing":
        assert re.search(r"exitcode\s*:\s*5\b", output), output
