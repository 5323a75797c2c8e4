"""Two ways in for a resource: a fast dict-level path (orjson + direct dict access, used in the hot loop)
and a strict path that also validates against the fhir.resources R4B models.

Nothing here raises on bad data: a bad resource is counted in an IngestReport under a stable reason and
logged at debug level, and the caller skips it.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import orjson

log = logging.getLogger("fhir_adapters.ingest")

# Stable reason codes (tests, logs and the CLI report use them).
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_RESOURCE_TYPE = "missing_resource_type"
WRONG_RESOURCE_TYPE = "wrong_resource_type"
INVALID_RESOURCE = "invalid_resource"  # strict mode: failed R4B validation
NO_SUBJECT = "no_subject"
UNKNOWN_PATIENT = "unknown_patient"
NO_EFFECTIVE_TIME = "no_effective_time"
MISSING_VALUE = "missing_value"
NON_NUMERIC_VALUE = "non_numeric_value"
MISSING_UNIT = "missing_unit"
UNCONVERTIBLE_UNIT = "unconvertible_unit"
STATUS_EXCLUDED = "status_excluded"
NO_ONSET = "no_onset"
BAD_DATE = "bad_date"
DUPLICATE = "duplicate"


# The element each reason is about, for people reading the rejections (`fhai-fhir preview --rejections`).
REASON_FIELDS = {
    MALFORMED_JSON: "(the line)",
    NOT_AN_OBJECT: "(the line)",
    MISSING_RESOURCE_TYPE: "resourceType",
    WRONG_RESOURCE_TYPE: "resourceType",
    INVALID_RESOURCE: "(see detail)",
    NO_SUBJECT: "subject.reference",
    UNKNOWN_PATIENT: "subject.reference",
    NO_EFFECTIVE_TIME: "effective[x]",
    MISSING_VALUE: "value[x]",
    NON_NUMERIC_VALUE: "valueQuantity.value",
    MISSING_UNIT: "valueQuantity.code",
    UNCONVERTIBLE_UNIT: "valueQuantity.code",
    STATUS_EXCLUDED: "status / verificationStatus",
    NO_ONSET: "onset[x]",
    BAD_DATE: "birthDate",
    DUPLICATE: "id",
}
MAX_EXAMPLES = 5  # kept per reason: enough to find the pattern, bounded whatever the input
_TYPE_ID = re.compile(r"^([A-Z][A-Za-z]+)/([A-Za-z0-9.-]{1,64})(?::\s*(.*))?$", re.DOTALL)


@dataclass(frozen=True)
class Rejection:
    """One example of a rejected resource: which one, and the element at fault."""

    reason: str
    resource_type: str
    id: str
    element: str
    detail: str

    @classmethod
    def of(cls, reason: str, what: str) -> Rejection:
        m = _TYPE_ID.match(what)
        rtype, rid, detail = (m.group(1), m.group(2), m.group(3) or "") if m else ("", "", what)
        return cls(reason, rtype, rid, REASON_FIELDS.get(reason, ""), detail)


@dataclass
class IngestReport:
    """What came in and what was turned away, by reason."""

    accepted: Counter[str] = field(default_factory=Counter)  # by resourceType
    rejected: Counter[str] = field(default_factory=Counter)  # by reason
    ignored: int = 0  # well-formed resources the spec does not use (other codes, other types)
    dropped_patients: Counter[str] = field(default_factory=Counter)  # rows left out of the table, by reason
    examples: dict[str, list[str]] = field(default_factory=dict)  # the first MAX_EXAMPLES ids/snippets per reason

    def reject(self, reason: str, what: str = "") -> None:
        self.rejected[reason] += 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < MAX_EXAMPLES:
            kept.append(what[:200])
        log.debug("rejected (%s): %s", reason, what[:200])

    def rejections(self) -> list[Rejection]:
        """The kept examples, by reason (most frequent reason first)."""
        return [Rejection.of(r, w) for r, _ in self.rejected.most_common() for w in self.examples.get(r, ())]

    @property
    def total_rejected(self) -> int:
        return sum(self.rejected.values())

    def merge(self, other: IngestReport) -> None:
        self.accepted.update(other.accepted)
        self.rejected.update(other.rejected)
        self.dropped_patients.update(other.dropped_patients)
        self.ignored += other.ignored
        for k, v in other.examples.items():
            kept = self.examples.setdefault(k, [])
            kept += v[: MAX_EXAMPLES - len(kept)]

    def as_dict(self) -> dict[str, Any]:
        return {
            "accepted": dict(self.accepted),
            "rejected": dict(self.rejected),
            "ignored": self.ignored,
            "dropped_patients": dict(self.dropped_patients),
        }


def parse_json(raw: bytes | str, report: IngestReport) -> dict[str, Any] | None:
    """orjson parse of one resource; None (and a counted reason) when it is not a JSON object."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        report.reject(MALFORMED_JSON, raw[:120].decode("utf-8", "replace") if isinstance(raw, bytes) else raw)
        return None
    if not isinstance(obj, dict):
        report.reject(NOT_AN_OBJECT, str(obj)[:120])
        return None
    return obj


@cache
def _r4b_model(resource_type: str) -> Any:
    from fhir.resources.R4B import get_fhir_model_class

    try:
        return get_fhir_model_class(resource_type)
    except (KeyError, ValueError, ImportError, AttributeError):
        return None


def r4b_errors(resource: dict[str, Any]) -> str | None:
    """None when `resource` validates against its fhir.resources R4B model, else the first error message."""
    from pydantic import ValidationError

    model = _r4b_model(str(resource.get("resourceType")))
    if model is None:
        return f"no R4B model for resourceType {resource.get('resourceType')!r}"
    try:
        model.model_validate(resource)
    except ValidationError as e:
        err = e.errors()[0]
        return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
    except Exception as e:  # model validators can raise plain errors on odd input
        return str(e)
    return None


def strict_check(report: IngestReport) -> Callable[[dict[str, Any]], bool]:
    """A resource gate for strict mode: True to keep, False (counted) when R4B validation fails."""

    def check(resource: dict[str, Any]) -> bool:
        err = r4b_errors(resource)
        if err is None:
            return True
        report.reject(INVALID_RESOURCE, f"{resource.get('resourceType')}/{resource.get('id')}: {err}")
        return False

    return check
