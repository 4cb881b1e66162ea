"""Read the guest's junit.xml and match its test cases to the host's."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from xml.etree import ElementTree

from .suites import GuestCase


class Outcome(StrEnum):
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class CaseResult:
    """One <testcase> of the guest's junit.xml."""

    classname: str
    name: str
    outcome: Outcome
    message: str = ""
    details: str = ""
    seconds: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.classname}::{self.name}"


def parse_junit(path: Path) -> list[CaseResult]:
    """All test cases in a pytest junit.xml (failures and errors both count as failed)."""
    root = ElementTree.parse(path).getroot()
    results = []
    for case in root.iter("testcase"):
        outcome, message, details = Outcome.PASSED, "", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = Outcome.FAILED
                message, details = child.get("message", ""), child.text or ""
                break
            if child.tag == "skipped":
                outcome = Outcome.SKIPPED
                message, details = child.get("message", ""), child.text or ""
        results.append(
            CaseResult(
                classname=case.get("classname", ""),
                name=case.get("name", ""),
                outcome=outcome,
                message=message,
                details=details,
                seconds=float(case.get("time", "0") or 0),
            )
        )
    return results


def results_for(case: GuestCase, results: list[CaseResult]) -> list[CaseResult]:
    """The junit entries of one guest test: itself, or all its parametrizations.

    A file that failed to import appears as one entry with an empty
    classname and the module as its name; it counts for every test in it.
    """
    expected = case.junit_classname
    module = case.junit_module
    return [
        result
        for result in results
        if (
            (result.classname == expected or result.classname.endswith(f".{expected}"))
            and (result.name == case.function or result.name.startswith(f"{case.function}["))
        )
        or (not result.classname and (result.name == module or result.name.endswith(f".{module}")))
    ]
