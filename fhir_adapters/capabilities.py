"""Reading a server's CapabilityStatement (pure): which FHIR release it speaks, and what the mirror may use
(type-level _history for deletions, Bulk $export for a first sync)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from .errors import FhirVersionError

SUPPORTED_VERSIONS = ("4.0.", "4.3.")  # R4 and R4B
# fhirVersion prefixes of the published releases and ballots (the longest prefix that matches names it)
RELEASES = (
    ("0.0.", "DSTU1"),
    ("0.", "DSTU2 draft"),
    ("1.0.", "DSTU2"),
    ("1.", "STU3 draft"),
    ("3.0.", "STU3"),
    ("3.", "R4 draft"),
    ("4.0.", "R4"),
    ("4.3.", "R4B"),
    ("4.", "R5 draft"),
    ("5.0.", "R5"),
    ("5.", "R6 draft"),
    ("6.", "R6 draft"),
)
BASE_URL_SUFFIXES = ("/fhir", "/R4", "/baseR4", "/fhir/R4")


def release_name(version: str) -> str:
    """'R4', 'STU3', 'DSTU2', 'R5'... for a fhirVersion; '' when it names no known release."""
    hits = [(len(prefix), release) for prefix, release in RELEASES if version.startswith(prefix)]
    return max(hits)[1] if hits else ""


def check_fhir_version(cs: Mapping[str, Any]) -> str:
    """fhirVersion of a CapabilityStatement; raises FhirVersionError unless 4.0.x (R4) or 4.3.x (R4B), naming
    the release the server speaks (DSTU2 answers /metadata with a `Conformance`)."""
    rtype = cs.get("resourceType")
    version = str(cs.get("fhirVersion") or "")
    if rtype == "Conformance":
        release = release_name(version) if version else "DSTU2"
        raise FhirVersionError(
            f"the server speaks FHIR {release or 'DSTU2 or older'} ({version or 'no fhirVersion'}: its /metadata "
            "is a Conformance statement, which R4 replaced with CapabilityStatement), not R4",
            hint="FH-AI needs a FHIR R4 (4.0.x) or R4B (4.3.x) endpoint; ask for the server's R4 base URL",
        )
    if rtype != "CapabilityStatement":
        raise FhirVersionError(
            "the server's /metadata is not a CapabilityStatement", hint="check that the URL is a FHIR base URL"
        )
    if not version.startswith(SUPPORTED_VERSIONS):
        release = release_name(version)
        said = f"{release} ({version})" if release else (version or "(no fhirVersion)")
        raise FhirVersionError(
            f"the server speaks FHIR {said}, not R4",
            hint="FH-AI needs a FHIR R4 (4.0.x) or R4B (4.3.x) endpoint; ask for the server's R4 base URL",
        )
    return version


def _server_rest(cs: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [r for r in cs.get("rest") or () if isinstance(r, dict) and r.get("mode", "server") == "server"]


def _names(items: object, key: str) -> set[str]:
    return {str(i.get(key)) for i in items or () if isinstance(i, dict)}  # type: ignore[attr-defined]


def supports_type_history(cs: Mapping[str, Any], resource_type: str) -> bool:
    """Whether `[type]/_history` is offered (interaction history-type on that resource)."""
    for rest in _server_rest(cs):
        for res in rest.get("resource") or ():
            if isinstance(res, dict) and res.get("type") == resource_type:
                return "history-type" in _names(res.get("interaction"), "code")
    return False


def export_level(cs: Mapping[str, Any]) -> Literal["system", "patient"] | None:
    """Where Bulk $export is offered: 'system' ([base]/$export), 'patient' (Patient/$export) or None."""
    for rest in _server_rest(cs):
        if "export" in _names(rest.get("operation"), "name"):
            return "system"
    for rest in _server_rest(cs):
        for res in rest.get("resource") or ():
            if (
                isinstance(res, dict)
                and res.get("type") == "Patient"
                and "export" in _names(res.get("operation"), "name")
            ):
                return "patient"
    return None


def base_url_candidates(url: str) -> list[str]:
    """URLs a FHIR base usually has below a server root (https://host -> https://host/fhir ...)."""
    base = url.rstrip("/").removesuffix("/metadata")
    return [base + s for s in BASE_URL_SUFFIXES if not base.endswith(s)]
