"""Seeded synthetic hospitals as FHIR R4 (Patient, Observation, Condition) for demos, tests and benchmarks.

Sites differ the way real ones do: age mix, sex mix, prevalence (intercept shift), missingness, small
calibration offsets, and units (one site reports glucose in mmol/L and weight in [lb_av], one codes
diabetes in ICD-10 instead of SNOMED CT). Labels come from a known logistic model (`RISK_MODEL`) over the
true values at the index date, so a model trained on the feature tables can be checked against it.

Traps for leaky pipelines are planted on purpose: every patient has a glucose measured after the index date
(raised for the patients who go on to develop diabetes), and some negatives get a diabetes diagnosis after the
prediction horizon. A correct feature builder sees neither.

    hospitals = generate_hospitals(5, seed=7)
    hospitals[0].write_ndjson("out/site-a")
"""

from __future__ import annotations

import gzip
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from .featurespec import ICD10CM, LOINC, SNOMED
from .timeutil import date_to_days
from .units import GLUCOSE_MG_DL_PER_MMOL_L
from .validation import IngestReport

INDEX_DATE = date(2024, 1, 1)
LOOKBACK_DAYS = 730
HORIZON_DAYS = 730
UCUM = "http://unitsofmeasure.org"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"

# code, display, category, canonical unit
GLUCOSE = ("2339-0", "Glucose [Mass/volume] in Blood", "laboratory", "mg/dL")
BMI = ("39156-5", "Body mass index (BMI) [Ratio]", "vital-signs", "kg/m2")
WEIGHT = ("29463-7", "Body weight", "vital-signs", "kg")
HEIGHT = ("8302-2", "Body height", "vital-signs", "cm")
HEART_RATE = ("8867-4", "Heart rate", "vital-signs", "/min")
BP_PANEL = ("85354-9", "Blood pressure panel with all children optional", "vital-signs", "mm[Hg]")
SYSTOLIC = ("8480-6", "Systolic blood pressure")
DIASTOLIC = ("8462-4", "Diastolic blood pressure")
T2DM_SNOMED = ("44054006", "Diabetes mellitus type 2")
T2DM_ICD10 = ("E11.9", "Type 2 diabetes mellitus without complications")
HYPERTENSION_SNOMED = ("59621000", "Essential hypertension")


@dataclass(frozen=True)
class RiskModel:
    """P(T2DM within the horizon) = sigmoid(intercept + site_shift + sum coef * (x - center) / scale)."""

    intercept: float
    terms: dict[str, tuple[float, float, float]]  # feature -> (coef, center, scale)

    def logit(self, x: dict[str, npt.NDArray[np.float64]], site_shift: float = 0.0) -> npt.NDArray[np.float64]:
        z = np.full(len(next(iter(x.values()))), self.intercept + site_shift)
        for name, (coef, center, scale) in self.terms.items():
            z = z + coef * (x[name] - center) / scale
        return z

    def probability(self, x: dict[str, npt.NDArray[np.float64]], site_shift: float = 0.0) -> npt.NDArray[np.float64]:
        return 1.0 / (1.0 + np.exp(-self.logit(x, site_shift)))


RISK_MODEL = RiskModel(
    intercept=-1.9,
    terms={
        "age": (0.7, 55.0, 15.0),
        "bmi": (0.6, 28.0, 5.0),
        "glucose": (1.1, 100.0, 15.0),  # mg/dL
        "systolic": (0.3, 125.0, 15.0),
        "sex_male": (0.25, 0.5, 0.5),
    },
)


@dataclass(frozen=True)
class SiteProfile:
    site_id: str
    name: str
    age_mean: float = 55.0
    age_sd: float = 14.0
    male_fraction: float = 0.5
    prevalence_shift: float = 0.0  # added to the risk model's logit
    bmi_shift: float = 0.0
    glucose_unit: str = "mg/dL"  # or mmol/L
    weight_unit: str = "kg"  # or [lb_av]
    label_system: str = SNOMED  # or ICD10CM
    glucose_offset: float = 0.0  # calibration bias of the site's lab, mg/dL
    weight_offset: float = 0.0  # kg: a scale that reads heavy
    missing: dict[str, float] = field(default_factory=dict)  # feature -> probability a patient has none
    visits: tuple[int, int] = (1, 4)  # measurements per patient and code, [lo, hi)


DEFAULT_PROFILES = (
    SiteProfile("site-a", "Alpha General", age_mean=52, missing={"glucose": 0.05, "heart_rate": 0.1}),
    SiteProfile(
        "site-b",
        "Beta University",
        age_mean=60,
        age_sd=12,
        prevalence_shift=0.4,
        glucose_unit="mmol/L",
        weight_unit="[lb_av]",
        glucose_offset=2.0,
        missing={"bmi": 0.2, "systolic": 0.1},
    ),
    SiteProfile(
        "site-c",
        "Gamma Community",
        age_mean=45,
        age_sd=16,
        male_fraction=0.42,
        prevalence_shift=-0.5,
        bmi_shift=-1.5,
        label_system=ICD10CM,
        weight_offset=0.8,
        missing={"glucose": 0.3, "height": 0.25},
    ),
    SiteProfile("site-d", "Delta Regional", age_mean=63, prevalence_shift=0.2, bmi_shift=1.5, glucose_offset=-2.5),
    SiteProfile(
        "site-e",
        "Epsilon Clinic",
        age_mean=40,
        age_sd=10,
        male_fraction=0.6,
        prevalence_shift=0.3,
        missing={"glucose": 0.15, "systolic": 0.3, "heart_rate": 0.3},
        visits=(1, 3),
    ),
)
DEFAULT_SIZES = (1200, 900, 700, 800, 120)  # the last site is small


def _iso(days: npt.NDArray[np.float64]) -> list[str]:
    secs = np.round(days * 86400.0).astype("int64").astype("datetime64[s]")
    return [s + "Z" for s in np.datetime_as_string(secs, unit="s").tolist()]


def _iso_date(days: npt.NDArray[np.float64]) -> list[str]:
    return np.datetime_as_string(np.floor(days).astype("int64").astype("datetime64[D]")).tolist()


def _obs(
    oid: str,
    pid: str,
    code: tuple[str, ...],
    when: str,
    value: float,
    unit: str,
) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "category": [{"coding": [{"system": OBS_CATEGORY, "code": code[2]}]}],
        "code": {"coding": [{"system": LOINC, "code": code[0], "display": code[1]}], "text": code[1]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
    }


def _bp(oid: str, pid: str, when: str, sbp: float, dbp: float) -> dict[str, Any]:
    def comp(c: tuple[str, str], v: float) -> dict[str, Any]:
        return {
            "code": {"coding": [{"system": LOINC, "code": c[0], "display": c[1]}]},
            "valueQuantity": {"value": v, "unit": "mm[Hg]", "system": UCUM, "code": "mm[Hg]"},
        }

    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "category": [{"coding": [{"system": OBS_CATEGORY, "code": "vital-signs"}]}],
        "code": {"coding": [{"system": LOINC, "code": BP_PANEL[0], "display": BP_PANEL[1]}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": when,
        "component": [comp(SYSTOLIC, sbp), comp(DIASTOLIC, dbp)],
    }


def _condition(cid: str, pid: str, system: str, code: tuple[str, str], onset: str) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": cid,
        "clinicalStatus": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]
        },
        "verificationStatus": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-verification", "code": "confirmed"}]
        },
        "code": {"coding": [{"system": system, "code": code[0], "display": code[1]}], "text": code[1]},
        "subject": {"reference": f"Patient/{pid}"},
        "onsetDateTime": onset,
        "recordedDate": onset,
    }


@dataclass
class Hospital:
    """One synthetic site: its resources plus the ground truth they were drawn from."""

    profile: SiteProfile
    patients: list[dict[str, Any]]
    observations: list[dict[str, Any]]
    conditions: list[dict[str, Any]]
    truth: dict[str, npt.NDArray[np.float64]]  # true age, bmi, glucose (mg/dL), systolic, sex_male, p, label

    @property
    def site_id(self) -> str:
        return self.profile.site_id

    @property
    def n_patients(self) -> int:
        return len(self.patients)

    def resources(self, types: Collection[str] | None = None) -> Iterator[dict[str, Any]]:
        for rtype, items in (("Patient", self.patients), ("Observation", self.observations)):
            if types is None or rtype in types:
                yield from items
        if types is None or "Condition" in types:
            yield from self.conditions

    def iter_resources(
        self, types: Collection[str] | None = None, report: IngestReport | None = None
    ) -> Iterator[dict[str, Any]]:
        """ResourceSource interface."""
        return self.resources(types)

    def write_ndjson(self, directory: str | Path, *, gz: bool = False) -> list[Path]:
        """Bulk Data layout: one <Type>.ndjson (or .ndjson.gz) per resource type."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        paths = []
        for rtype, items in (
            ("Patient", self.patients),
            ("Observation", self.observations),
            ("Condition", self.conditions),
        ):
            path = d / f"{rtype}.ndjson{'.gz' if gz else ''}"
            data = b"".join(orjson.dumps(r) + b"\n" for r in items)
            path.write_bytes(gzip.compress(data, compresslevel=1) if gz else data)
            paths.append(path)
        return paths

    def transaction_bundles(self, patients_per_bundle: int = 100) -> Iterator[dict[str, Any]]:
        """Transaction Bundles of PUT entries, each carrying whole patients with their resources."""
        by_patient: dict[str, list[dict[str, Any]]] = {}
        for r in (*self.observations, *self.conditions):
            by_patient.setdefault(r["subject"]["reference"][8:], []).append(r)
        for start in range(0, len(self.patients), patients_per_bundle):
            entries = []
            for pat in self.patients[start : start + patients_per_bundle]:
                for r in (pat, *by_patient.get(pat["id"], ())):
                    entries.append(
                        {
                            "fullUrl": f"{r['resourceType']}/{r['id']}",
                            "resource": r,
                            "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
                        }
                    )
            yield {"resourceType": "Bundle", "type": "transaction", "entry": entries}

    def write_bundles(self, directory: str | Path, *, patients_per_bundle: int = 100, gz: bool = False) -> list[Path]:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, bundle in enumerate(self.transaction_bundles(patients_per_bundle)):
            path = d / f"{self.site_id}-{i:04d}.json{'.gz' if gz else ''}"
            data = orjson.dumps(bundle)
            path.write_bytes(gzip.compress(data, compresslevel=1) if gz else data)
            paths.append(path)
        return paths

    def load_into(self, client: Any, *, patients_per_bundle: int = 100) -> int:
        """POST the transaction Bundles to a FHIR server (a fhir_adapters FhirClient); returns entries sent."""
        sent = 0
        for bundle in self.transaction_bundles(patients_per_bundle):
            client.transaction(bundle)
            sent += len(bundle["entry"])
        return sent


def generate_hospital(
    profile: SiteProfile, n_patients: int, rng: np.random.Generator, *, risk: RiskModel = RISK_MODEL
) -> Hospital:
    n = n_patients
    index = date_to_days(INDEX_DATE)
    sid = profile.site_id
    age = np.clip(rng.normal(profile.age_mean, profile.age_sd, n), 18, 95)
    male = (rng.random(n) < profile.male_fraction).astype(np.float64)
    height = np.where(male == 1, rng.normal(176, 7, n), rng.normal(163, 6.5, n))
    bmi = np.clip(rng.normal(27.5 + profile.bmi_shift + 0.04 * (age - 55), 4.5, n), 16, 55)
    glucose = np.clip(rng.normal(92 + 1.2 * (bmi - 27.5) + 0.35 * (age - 55), 13, n), 60, 300)
    systolic = np.clip(rng.normal(122 + 0.45 * (age - 55) + 0.6 * (bmi - 27.5), 13, n), 85, 220)
    heart_rate = np.clip(rng.normal(72 + 0.3 * (bmi - 27.5), 9, n), 40, 140)
    truth = {"age": age, "bmi": bmi, "glucose": glucose, "systolic": systolic, "sex_male": male}
    p = risk.probability(truth, profile.prevalence_shift)
    label = (rng.random(n) < p).astype(np.float64)
    truth = {**truth, "height": height, "heart_rate": heart_rate, "p": p, "label": label}

    pids = [f"{sid}-p{i:06d}" for i in range(n)]
    birth = index - age * 365.25 - rng.uniform(0, 1, n)
    patients = [
        {
            "resourceType": "Patient",
            "id": pid,
            "identifier": [{"system": f"urn:fhai:{sid}:mrn", "value": f"MRN{i:07d}"}],
            "gender": "male" if m else "female",
            "birthDate": b,
        }
        for i, (pid, m, b) in enumerate(zip(pids, male.tolist(), _iso_date(birth), strict=True))
    ]

    observations: list[dict[str, Any]] = []
    lo, hi = profile.visits

    def measured(name: str) -> npt.NDArray[np.int64]:
        counts = rng.integers(lo, hi, n)
        counts[rng.random(n) < profile.missing.get(name, 0.0)] = 0
        return counts

    def emit(name: str, code: tuple[str, ...], true: npt.NDArray[np.float64], sd: float, unit: str, nd: int) -> None:
        counts = measured(name)
        who = np.repeat(np.arange(n), counts)
        when = _iso(index - rng.uniform(1, LOOKBACK_DAYS - 1, len(who)))
        vals = np.round(true[who] + rng.normal(0, sd, len(who)), nd).tolist()
        base = len(observations)
        observations.extend(
            _obs(f"{sid}-o{base + k:07d}", pids[w], code, t, v, unit)
            for k, (w, t, v) in enumerate(zip(who.tolist(), when, vals, strict=True))
        )

    g = glucose + profile.glucose_offset
    if profile.glucose_unit == "mmol/L":
        emit("glucose", GLUCOSE, g / GLUCOSE_MG_DL_PER_MMOL_L, 0.4, "mmol/L", 1)
    else:
        emit("glucose", GLUCOSE, g, 7.0, "mg/dL", 0)
    weight = bmi * (height / 100) ** 2 + profile.weight_offset
    if profile.weight_unit == "[lb_av]":
        emit("weight", WEIGHT, weight / 0.45359237, 2.0, "[lb_av]", 1)
    else:
        emit("weight", WEIGHT, weight, 1.0, "kg", 1)
    emit("height", HEIGHT, height, 0.8, "cm", 1)
    emit("bmi", BMI, bmi, 0.6, "kg/m2", 1)
    emit("heart_rate", HEART_RATE, heart_rate, 6.0, "/min", 0)

    counts = measured("systolic")
    who = np.repeat(np.arange(n), counts)
    when = _iso(index - rng.uniform(1, LOOKBACK_DAYS - 1, len(who)))
    sbp = np.round(systolic[who] + rng.normal(0, 8, len(who))).tolist()
    dbp = np.round(0.6 * systolic[who] + rng.normal(5, 6, len(who))).tolist()
    base = len(observations)
    observations.extend(
        _bp(f"{sid}-o{base + k:07d}", pids[w], t, s, d)
        for k, (w, t, s, d) in enumerate(zip(who.tolist(), when, sbp, dbp, strict=True))
    )

    # Leak bait: one glucose after the index date, much higher in those who develop diabetes.
    after = _iso(index + rng.uniform(1, HORIZON_DAYS, n))
    post = g + 70.0 * label + rng.normal(0, 7, n)
    unit = profile.glucose_unit
    post_v = np.round(post / GLUCOSE_MG_DL_PER_MMOL_L, 1) if unit == "mmol/L" else np.round(post)
    base = len(observations)
    observations.extend(
        _obs(f"{sid}-o{base + k:07d}", pids[k], GLUCOSE, after[k], v, unit) for k, v in enumerate(post_v.tolist())
    )

    # Diagnoses: positives within the horizon; some negatives after it (must not count); some hypertension.
    t2dm = T2DM_ICD10 if profile.label_system == ICD10CM else T2DM_SNOMED
    conditions: list[dict[str, Any]] = []
    onset_in = _iso(index + rng.uniform(30, HORIZON_DAYS - 1, n))
    onset_late = _iso(index + HORIZON_DAYS + rng.uniform(30, 900, n))
    late = (label == 0) & (rng.random(n) < 0.1)
    hyper = rng.random(n) < 1 / (1 + np.exp(-(systolic - 140) / 8))
    onset_h = _iso(index - rng.uniform(30, 3000, n))
    for i in range(n):
        if label[i]:
            conditions.append(
                _condition(f"{sid}-c{len(conditions):06d}", pids[i], profile.label_system, t2dm, onset_in[i])
            )
        elif late[i]:
            conditions.append(
                _condition(f"{sid}-c{len(conditions):06d}", pids[i], profile.label_system, t2dm, onset_late[i])
            )
        if hyper[i]:
            conditions.append(
                _condition(f"{sid}-c{len(conditions):06d}", pids[i], SNOMED, HYPERTENSION_SNOMED, onset_h[i])
            )
    return Hospital(profile, patients, observations, conditions, truth)


def site_profile(i: int, rng: np.random.Generator) -> SiteProfile:
    """The i-th default profile, or a seeded variant of one for more than five sites."""
    base = DEFAULT_PROFILES[i % len(DEFAULT_PROFILES)]
    if i < len(DEFAULT_PROFILES):
        return base
    letter = chr(ord("a") + i) if i < 26 else str(i)
    return SiteProfile(
        f"site-{letter}",
        f"Site {letter.upper()}",
        age_mean=float(rng.uniform(40, 65)),
        age_sd=float(rng.uniform(10, 16)),
        male_fraction=float(rng.uniform(0.4, 0.6)),
        prevalence_shift=float(rng.normal(0, 0.4)),
        bmi_shift=float(rng.normal(0, 1)),
        glucose_unit=base.glucose_unit,
        weight_unit=base.weight_unit,
        label_system=base.label_system,
        glucose_offset=float(rng.normal(0, 2)),
        missing=dict(base.missing),
    )


def generate_hospitals(
    n_hospitals: int = 5,
    seed: int = 0,
    sizes: Sequence[int] | None = None,
    *,
    profiles: Sequence[SiteProfile] | None = None,
    risk: RiskModel = RISK_MODEL,
) -> list[Hospital]:
    """N non-IID hospitals, reproducible from `seed`. sizes default to DEFAULT_SIZES (the last site small)."""
    if sizes is None:
        sizes = [DEFAULT_SIZES[i] if i < len(DEFAULT_SIZES) - 1 else 1000 for i in range(n_hospitals)]
        if n_hospitals > 1:
            sizes[-1] = DEFAULT_SIZES[-1]
    if len(sizes) != n_hospitals:
        raise ValueError(f"sizes has {len(sizes)} entries for {n_hospitals} hospitals")
    root = np.random.default_rng(seed)
    streams = root.spawn(n_hospitals + 1)
    profile_rng = streams[-1]
    out = []
    for i in range(n_hospitals):
        prof = profiles[i] if profiles is not None else site_profile(i, profile_rng)
        out.append(generate_hospital(prof, int(sizes[i]), streams[i], risk=risk))
    return out
