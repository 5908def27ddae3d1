"""Testing aids: the resume harness for users' tests (``harness``) and, for ckptguard's own
reliability tests, fault injection (``faults``, imported on demand: it wraps core functions).

``from ckptguard.testing import assert_resumes_exactly`` keeps working: the harness's public
names are re-exported here.
"""

from ckptguard.testing.harness import (
    ResumeContext,
    ResumeReport,
    assert_resumes_exactly,
    compare_runs,
    run_resume_check,
)

__all__ = ["ResumeContext", "ResumeReport", "assert_resumes_exactly", "compare_runs", "run_resume_check"]
