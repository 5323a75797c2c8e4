"""Errors of the FHIR adapters: each has a stable code and a message that says what to do next."""

from __future__ import annotations


class FhirAdapterError(Exception):
    """Base error. `code` is stable (for logs, dashboards and tests); `hint` tells the user what to do."""

    code = "FHIR-000"

    def __init__(self, message: str, *, hint: str = "", detail: str = "") -> None:
        self.message = message
        self.hint = hint
        self.detail = detail  # long technical detail (server body...), for the log rather than the user
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = f"[{self.code}] {self.message}"
        return f"{text} - {self.hint}" if self.hint else text


class FhirConnectionError(FhirAdapterError):
    code = "FHIR-001"


class FhirVersionError(FhirAdapterError):
    code = "FHIR-002"


class FhirAuthError(FhirAdapterError):
    code = "FHIR-003"


class FhirHttpError(FhirAdapterError):
    code = "FHIR-004"

    def __init__(self, message: str, *, status: int, hint: str = "", detail: str = "") -> None:
        self.status = status
        super().__init__(message, hint=hint, detail=detail)


class BulkExportError(FhirAdapterError):
    code = "FHIR-005"


class FeatureSpecError(FhirAdapterError):
    code = "FHIR-006"


class SourceError(FhirAdapterError):
    code = "FHIR-007"


class UnitError(FhirAdapterError):
    code = "FHIR-008"


class FhirBaseUrlError(FhirAdapterError):
    """The URL answers, but not as a FHIR base URL (404 or no CapabilityStatement on /metadata)."""

    code = "FHAI-F301"


class MirrorError(FhirAdapterError):
    """The edge's local mirror file cannot be opened, read or written."""

    code = "FHAI-F302"
