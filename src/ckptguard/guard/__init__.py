"""Resume guard: checks at load, the run trace and its first-divergence report, the audit.

* ``resume_guard.ResumeGuard``: what ``CheckpointManager`` calls at save, load and ``record``;
* ``checks`` / ``statecheck``: the checks themselves (manifest vs live setup; tensors);
* ``trace`` / ``divergence``: the per-rank run trace and how a resumed run is compared with it;
* ``roundtrip``: ``verify_roundtrip``, the in-process save -> restore experiment;
* ``audit``: ``ckptguard audit ROOT``: every resume in a trace, its findings and divergence.
"""

from ckptguard.guard.findings import Divergence, Finding, GuardReport, Severity

__all__ = ["Divergence", "Finding", "GuardReport", "Severity"]
