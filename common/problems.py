"""A problem found in a site's data: the one record every check returns.

Shared by the manifest and site checks (``common.validation``) and the
image/mask file checks (``common.filecheck``), so each names the file and
the patient the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    """One problem found in a site's data, naming the file and the patient."""

    severity: Severity
    patient_id: str | None  # None for site-level problems
    file: str  # the offending file, as joined from the site folder given
    code: str  # short stable machine code, counted by ``SiteReport.aggregate``
    message: str

    def __str__(self) -> str:
        who = f"patient {self.patient_id}: " if self.patient_id else ""
        return f"{self.severity.upper()}  {self.file}  {who}{self.message}"
