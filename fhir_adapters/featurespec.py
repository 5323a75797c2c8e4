"""Feature specs: which FHIR codes become which columns, the index date, the label. YAML in, pydantic out.

Time rules (see docs/fhir.md):
- index date: `fixed` (one date for everyone) or `last_observation` (each patient's latest Observation of a
  spec code, minus `offset_days`);
- features: an Observation counts when index - window_days < effective <= index;
- label: 1 when a Condition with a label code has onset <= index + horizon_days (later onsets do not count,
  so nothing after the horizon leaks into the label); with exclude_prevalent, patients whose onset is
  <= index are dropped (they already have the outcome).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import FeatureSpecError

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"

Aggregation = Literal["latest", "mean", "min", "max", "count"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Code(_Strict):
    system: str
    code: str


class FeatureDef(_Strict):
    name: str
    codes: list[Code] = Field(min_length=1)
    component: list[Code] | None = None  # take the value from Observation.component with one of these codes
    unit: str | None = None  # canonical UCUM unit; values in other units are converted or rejected
    analyte: str | None = None  # for molar <-> mass conversions (e.g. "glucose")
    aggregation: Aggregation = "latest"
    window_days: int | None = Field(default=None, gt=0)  # None: the spec's lookback_days

    @model_validator(mode="after")
    def _unit_needed(self) -> FeatureDef:
        # Without a canonical unit, values in different units would be mixed silently.
        if self.aggregation != "count" and self.unit is None:
            raise ValueError(f"feature {self.name!r} needs `unit` (its canonical UCUM unit)")
        return self

    @field_validator("name")
    @classmethod
    def _name_is_identifier(cls, v: str) -> str:
        if not v.replace("_", "").isalnum():
            raise ValueError("feature names must be letters, digits and underscores")
        return v


class IndexDate(_Strict):
    rule: Literal["fixed", "last_observation"] = "fixed"
    date: dt.date | None = None
    offset_days: int = 0  # last_observation only: index = last observation - offset_days

    @model_validator(mode="after")
    def _fixed_needs_date(self) -> IndexDate:
        if self.rule == "fixed" and self.date is None:
            raise ValueError("index_date.rule 'fixed' needs index_date.date (YYYY-MM-DD)")
        return self


class LabelDef(_Strict):
    name: str
    codes: list[Code] = Field(min_length=1)
    # ICD-10 codes match by prefix (E11 matches E11.9), SNOMED codes exactly.
    prefix_systems: list[str] = Field(default_factory=lambda: [ICD10, ICD10CM])
    horizon_days: int = Field(default=365, ge=0)
    exclude_prevalent: bool = False


class Demographics(_Strict):
    age: bool = True
    sex: bool = True


class Imputation(_Strict):
    strategy: Literal["mean", "zero"] = "mean"
    indicators: bool = True


class FeatureSpec(_Strict):
    name: str
    version: int = 1
    description: str = ""
    index_date: IndexDate
    lookback_days: int = Field(default=3 * 365, gt=0)
    demographics: Demographics = Field(default_factory=Demographics)
    features: list[FeatureDef] = Field(min_length=1)
    label: LabelDef
    imputation: Imputation = Field(default_factory=Imputation)

    @model_validator(mode="after")
    def _unique_names(self) -> FeatureSpec:
        names = [f.name for f in self.features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate feature names: {dupes}")
        return self

    def spec_hash(self) -> str:
        """Stable hash of what changes the table (not of the description), to match a model to its spec."""
        data = self.model_dump(mode="json", exclude={"description"})
        blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def observation_codes(self) -> set[tuple[str, str]]:
        return {(c.system, c.code) for f in self.features for c in f.codes}


def parse_spec(data: object) -> FeatureSpec:
    """Validate a spec given as a dict (e.g. the `feature_spec` section of a task YAML)."""
    if isinstance(data, dict) and "feature_spec" in data:
        data = data["feature_spec"]
    try:
        return FeatureSpec.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise FeatureSpecError(
            f"invalid feature spec at '{where}': {first['msg']}",
            hint="fix the task YAML (see docs/fhir.md, 'Feature specs')",
            detail=str(e),
        ) from e


def load_spec(path: str | Path) -> FeatureSpec:
    """Load a feature spec from a YAML file: either the spec itself or a task with a `feature_spec` key."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise FeatureSpecError(f"cannot read feature spec {p}: {e.strerror}", hint="check the path") from e
    except yaml.YAMLError as e:
        raise FeatureSpecError(f"{p} is not valid YAML", hint="fix the YAML syntax", detail=str(e)) from e
    return parse_spec(data)
