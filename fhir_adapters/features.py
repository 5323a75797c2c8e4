"""Feature tables from FHIR resources: the hot loop is plain dict access, the math is numpy on arrays.

`FeatureBuilder.add(resource)` extracts what the spec needs from one resource (Patient, Observation,
Condition) into flat per-feature arrays; `build()` applies the time rules of the spec (see featurespec.py),
aggregates, imputes and returns a `FeatureTable`. Records are sorted by (patient, time, value) before any
aggregation, so the table does not depend on the order the resources arrived in (search vs files).
"""

from __future__ import annotations

import csv
import logging
import os
import warnings
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from . import validation as v
from .featurespec import FeatureSpec
from .timeutil import date_to_days, days_to_date, to_days
from .units import Affine, converter
from .validation import IngestReport

log = logging.getLogger("fhir_adapters.features")

USED_TYPES = ("Patient", "Observation", "Condition")
EXCLUDED_OBS_STATUS = frozenset({"entered-in-error", "cancelled"})
EXCLUDED_VERIFICATION = frozenset({"entered-in-error", "refuted"})
DAYS_PER_YEAR = 365.25


@dataclass
class FeatureTable:
    """The model's input at one site. patient_ids stay local: only X-derived model updates leave."""

    X: npt.NDArray[np.float32]
    y: npt.NDArray[np.int32]
    columns: list[str]
    units: list[str | None]
    patient_ids: list[str]
    index_days: npt.NDArray[np.float64]  # each row's index date, days since 1970-01-01
    spec_hash: str
    spec_name: str
    label_name: str
    report: IngestReport = field(default_factory=IngestReport)

    @property
    def n_rows(self) -> int:
        return int(self.X.shape[0])

    def index_dates(self) -> list[str]:
        return [days_to_date(d).isoformat() for d in self.index_days]

    def equals(self, other: FeatureTable) -> bool:
        """Same rows, columns, values and labels (report and row order aside: rows are sorted by id)."""
        return (
            self.columns == other.columns
            and self.units == other.units
            and self.patient_ids == other.patient_ids
            and self.spec_hash == other.spec_hash
            and np.array_equal(self.y, other.y)
            and np.array_equal(self.X, other.X)
        )

    def to_csv(self, path: str | Path, *, include_ids: bool = True) -> Path:
        p = Path(path)
        with p.open("w", newline="") as f:
            w = csv.writer(f)
            head = (["patient_id"] if include_ids else []) + self.columns + [self.label_name]
            w.writerow(head)
            for i in range(self.n_rows):
                row: list[Any] = [self.patient_ids[i]] if include_ids else []
                row += [f"{x:.6g}" for x in self.X[i].tolist()]
                row.append(int(self.y[i]))
                w.writerow(row)
        return p


def _ref_id(ref: object, rtype: str = "Patient") -> str | None:
    """Logical id from 'Patient/1', 'http://x/fhir/Patient/1', 'Patient/1/_history/2' or 'urn:uuid:1'."""
    if not isinstance(ref, str):
        return None
    if ref.startswith("urn:uuid:"):
        return ref[9:]
    parts = ref.split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) >= 2 and parts[-2] == rtype:
        return parts[-1]
    return None


class _Channel:
    """One value stream shared by every feature that reads the same codes, component, unit and analyte
    (e.g. glucose mean and glucose max): extracted once, aggregated once per feature."""

    __slots__ = ("analyte", "comp_codes", "convs", "is_count", "pids", "seqs", "times", "unit", "values")

    def __init__(
        self, comp_codes: frozenset[tuple[str, str]] | None, unit: str | None, analyte: str | None, is_count: bool
    ):
        self.comp_codes = comp_codes
        self.unit = unit
        self.analyte = analyte
        self.is_count = is_count
        self.convs: dict[str | None, Affine | None] = {}
        self.pids: list[int] = []
        self.times: list[str] = []  # raw FHIR dateTimes: parsed in bulk by build() (see parse_times)
        self.seqs: list[int] = []  # which observation each record came from
        self.values: list[float] = []

    def value(self, obs: dict[str, Any]) -> float | str:
        """The observation's value in the canonical unit, or the reason it has none."""
        if self.is_count:
            return 1.0
        if self.comp_codes is None:
            q = obs.get("valueQuantity")
        else:
            q = None
            for comp in obs.get("component") or ():
                if any((c.get("system"), c.get("code")) in self.comp_codes for c in comp["code"]["coding"]):
                    q = comp.get("valueQuantity")
                    break
        if not q:
            return v.MISSING_VALUE
        value = q.get("value")
        if value is None:
            return v.MISSING_VALUE
        if value.__class__ is not float and value.__class__ is not int:
            return v.NON_NUMERIC_VALUE
        unit = q.get("code") or q.get("unit")
        if unit is None:
            return v.MISSING_UNIT
        f = self.convs.get(unit)
        if f is None:
            f = self.convs[unit] = converter(unit, self.unit, self.analyte) if self.unit else None
            if f is None:
                return v.UNCONVERTIBLE_UNIT
        return value * f.scale + f.offset


class FeatureBuilder:
    """Streams resources in, builds one FeatureTable. strict=True validates used resources with R4B."""

    def __init__(self, spec: FeatureSpec, *, strict: bool = False, report: IngestReport | None = None) -> None:
        self.spec = spec
        self.report = report if report is not None else IngestReport()
        self._gate: Callable[[dict[str, Any]], bool] | None = v.strict_check(self.report) if strict else None
        channels: dict[tuple[Any, ...], _Channel] = {}
        self._features: list[tuple[Any, _Channel]] = []
        by_code: dict[tuple[str, str], list[_Channel]] = {}
        for f in spec.features:
            comp = frozenset((c.system, c.code) for c in f.component) if f.component else None
            is_count = f.aggregation == "count"
            key = (
                frozenset((c.system, c.code) for c in f.codes),
                comp,
                None if is_count else f.unit,
                f.analyte,
                is_count,
            )
            ch = channels.get(key)
            if ch is None:
                ch = channels[key] = _Channel(comp, f.unit, f.analyte, is_count)
                for c in f.codes:
                    by_code.setdefault((c.system, c.code), []).append(ch)
            self._features.append((f, ch))
        self._channels = list(channels.values())
        self._by_code: dict[tuple[str, str], tuple[_Channel, ...]] = {k: tuple(x) for k, x in by_code.items()}
        self._n_obs = 0
        lab = spec.label
        self._label_exact = {(c.system, c.code) for c in lab.codes if c.system not in lab.prefix_systems}
        self._label_prefix = [(c.system, c.code) for c in lab.codes if c.system in lab.prefix_systems]
        self._pid_index: dict[str, int] = {}
        self._patients: dict[str, tuple[float, float]] = {}  # id -> (birth days or nan, sex_male or nan)
        self._onset: dict[str, float] = {}  # id -> earliest onset of a label condition
        self._seen_obs: set[str] = set()
        self._obs_per_pid: list[int] = []  # accepted Observations per pid index (to count orphans once)

    def uses(self, res: dict[str, Any]) -> bool:
        """Whether `res` would feed the table (strict mode validates exactly these)."""
        rtype = res.get("resourceType")
        try:
            if rtype == "Patient":
                return True
            if rtype == "Observation":
                return any((c.get("system"), c.get("code")) in self._by_code for c in res["code"]["coding"])
            if rtype == "Condition":
                codings = (res.get("code") or {}).get("coding") or ()
                return any(self._is_label_code(c.get("system"), c.get("code")) for c in codings)
        except (AttributeError, TypeError, KeyError):
            return True  # malformed: let validation say why
        return False

    # ---------------- hot loop ----------------

    def add_json(self, raw: bytes | str) -> None:
        res = v.parse_json(raw, self.report)
        if res is not None:
            self.add(res)

    def add_all(self, resources: Iterable[dict[str, Any]]) -> FeatureBuilder:
        add_obs, add, report = self._add_observation, self.add, self.report
        for r in resources:
            if r.get("resourceType") != "Observation":
                add(r)
                continue
            try:  # Observations are most of the stream: dispatch them without the generic path
                add_obs(r)
            except (AttributeError, TypeError, KeyError, IndexError) as e:
                report.reject(v.INVALID_RESOURCE, f"Observation/{r.get('id')}: {e!r}")
        return self

    def add(self, res: dict[str, Any]) -> None:
        rtype = res.get("resourceType")
        try:
            if rtype == "Observation":
                self._add_observation(res)
            elif rtype == "Patient":
                self._add_patient(res)
            elif rtype == "Condition":
                self._add_condition(res)
            elif rtype is None:
                self.report.reject(v.MISSING_RESOURCE_TYPE, str(res.get("id")))
            elif not isinstance(rtype, str) or not rtype[:1].isupper():
                self.report.reject(v.WRONG_RESOURCE_TYPE, str(rtype))
            else:
                self.report.ignored += 1
        except (AttributeError, TypeError, KeyError, IndexError) as e:
            # structure that is not FHIR (a string where an object belongs...): count it, never crash
            self.report.reject(v.INVALID_RESOURCE, f"{rtype}/{res.get('id')}: {e!r}")

    def _add_observation(self, obs: dict[str, Any]) -> None:
        chans = None
        for c in obs["code"]["coding"]:
            chans = self._by_code.get((c.get("system"), c.get("code")))
            if chans is not None:
                break
        if chans is None:
            self.report.ignored += 1
            return
        if self._gate is not None and not self._gate(obs):
            return
        rid = obs.get("id")
        if obs.get("status") in EXCLUDED_OBS_STATUS:
            self.report.reject(v.STATUS_EXCLUDED, f"Observation/{rid}")
            return
        subject = obs.get("subject")
        ref = subject.get("reference") if subject else None
        # the common literal form first; _ref_id handles absolute, versioned and urn:uuid references
        pid = ref[8:] if ref.__class__ is str and ref.startswith("Patient/") and "/" not in ref[8:] else _ref_id(ref)
        if pid is None:
            self.report.reject(v.NO_SUBJECT, f"Observation/{rid}")
            return
        when = obs.get("effectiveDateTime") or obs.get("effectiveInstant")
        if when is None:
            period = obs.get("effectivePeriod")
            when = period.get("start") if period else obs.get("issued")
        if when.__class__ is not str:
            self.report.reject(v.NO_EFFECTIVE_TIME, f"Observation/{rid}")
            return
        t = when  # validated and converted in bulk by build(): one numpy parse instead of one call each
        seq = self._n_obs
        if len(chans) == 1:  # the common case, without the per-channel list
            ch = chans[0]
            val = ch.value(obs)
            if val.__class__ is str:
                self.report.reject(str(val), f"Observation/{rid}")
                return
            if rid is not None:
                seen = self._seen_obs
                if rid in seen:
                    self.report.reject(v.DUPLICATE, f"Observation/{rid}")
                    return
                seen.add(rid)
            p = self._pid_index.get(pid)
            if p is None:
                p = self._pid(pid)
            self._obs_per_pid[p] += 1
            ch.pids.append(p)
            ch.times.append(t)
            ch.values.append(val)  # type: ignore[arg-type]
            ch.seqs.append(seq)
            ch.seqs.append(seq)
            self._n_obs += 1
            return
        # several channels: an observation is accepted or rejected as a whole
        values = [ch.value(obs) for ch in chans]
        for val in values:
            if val.__class__ is str:
                self.report.reject(str(val), f"Observation/{rid}")
                return
        if rid is not None:
            if rid in self._seen_obs:
                self.report.reject(v.DUPLICATE, f"Observation/{rid}")
                return
            self._seen_obs.add(rid)
        p = self._pid_index.get(pid)
        if p is None:
            p = self._pid(pid)
        self._obs_per_pid[p] += 1
        for ch, val in zip(chans, values, strict=True):
            ch.pids.append(p)
            ch.times.append(t)
            ch.values.append(val)  # type: ignore[arg-type]
            ch.seqs.append(seq)
        self._n_obs += 1

    def _pid(self, pid: str) -> int:
        p = self._pid_index.get(pid)
        if p is None:
            p = self._pid_index[pid] = len(self._pid_index)
            self._obs_per_pid.append(0)
        return p

    def _add_patient(self, pat: dict[str, Any]) -> None:
        if self._gate is not None and not self._gate(pat):
            return
        pid = pat.get("id")
        if not isinstance(pid, str):
            self.report.reject(v.INVALID_RESOURCE, "Patient without id")
            return
        if pid in self._patients:
            self.report.reject(v.DUPLICATE, f"Patient/{pid}")
            return
        birth = pat.get("birthDate")
        b = to_days(birth) if birth is not None else None
        if birth is not None and b is None:
            self.report.reject(v.BAD_DATE, f"Patient/{pid}: birthDate {birth!r}")
            return
        gender = pat.get("gender")
        sex = 1.0 if gender == "male" else 0.0 if gender == "female" else float("nan")
        self._patients[pid] = (float("nan") if b is None else b, sex)
        self._pid(pid)
        self.report.accepted["Patient"] += 1

    def _is_label_code(self, system: object, code: object) -> bool:
        if (system, code) in self._label_exact:
            return True
        if not isinstance(code, str):
            return False
        return any(system == s and code.startswith(c) for s, c in self._label_prefix)

    def _add_condition(self, cond: dict[str, Any]) -> None:
        codings = (cond.get("code") or {}).get("coding") or ()
        if not any(self._is_label_code(c.get("system"), c.get("code")) for c in codings):
            self.report.ignored += 1
            return
        if self._gate is not None and not self._gate(cond):
            return
        rid = cond.get("id")
        ver = cond.get("verificationStatus")
        if ver and any(c.get("code") in EXCLUDED_VERIFICATION for c in ver.get("coding") or ()):
            self.report.reject(v.STATUS_EXCLUDED, f"Condition/{rid}")
            return
        subject = cond.get("subject")
        pid = _ref_id(subject.get("reference")) if subject else None
        if pid is None:
            self.report.reject(v.NO_SUBJECT, f"Condition/{rid}")
            return
        onset = cond.get("onsetDateTime")
        if onset is None:
            period = cond.get("onsetPeriod")
            onset = period.get("start") if period else cond.get("recordedDate")
        t = to_days(onset)
        if t is None:
            # Without an onset we cannot tell whether it leaks past the horizon: leave it out.
            self.report.reject(v.NO_ONSET, f"Condition/{rid}")
            return
        prev = self._onset.get(pid)
        if prev is None or t < prev:
            self._onset[pid] = t
        self.report.accepted["Condition"] += 1

    # ---------------- table ----------------

    def build(self) -> FeatureTable:
        spec = self.spec
        report = self.report
        rows = sorted(self._patients)
        n_all = len(self._pid_index)
        # pid index (arrival order) -> row (sorted id order), -1 for patients without a Patient resource
        to_row = np.full(n_all, -1, dtype=np.int64)
        for r, pid in enumerate(rows):
            to_row[self._pid_index[pid]] = r
        parsed = [parse_times(ch.times) for ch in self._channels]
        bad_seqs: set[int] = set()
        for ch, T in zip(self._channels, parsed, strict=True):
            for i in np.flatnonzero(np.isnan(T)).tolist():
                if ch.seqs[i] not in bad_seqs:
                    bad_seqs.add(ch.seqs[i])
                    report.reject(v.NO_EFFECTIVE_TIME, f"Observation with effective time {ch.times[i]!r}")
                    self._obs_per_pid[ch.pids[i]] -= 1
        report.accepted["Observation"] += self._n_obs - len(bad_seqs)
        self._n_obs = 0
        orphans = [pid for pid, p in self._pid_index.items() if to_row[p] < 0 and self._obs_per_pid[p]]
        for pid in orphans:
            n_obs = self._obs_per_pid[self._pid_index[pid]]
            report.reject(v.UNKNOWN_PATIENT, f"{n_obs} Observations of Patient/{pid}, which is not in the data")
            report.rejected[v.UNKNOWN_PATIENT] += n_obs - 1
            report.accepted["Observation"] -= n_obs
        arrays = []
        for feat, T in zip(self._channels, parsed, strict=True):
            P = to_row[np.asarray(feat.pids, dtype=np.int64)] if feat.pids else np.empty(0, np.int64)
            V = np.asarray(feat.values, dtype=np.float64)
            ok = ~np.isnan(T)
            if not ok.all():
                P, T, V = P[ok], T[ok], V[ok]
            if orphans:
                keep = P >= 0
                P, T, V = P[keep], T[keep], V[keep]
            order = np.lexsort((V, T, P))
            arrays.append((P[order], T[order], V[order]))
        n = len(rows)
        index = self._index_days(rows, arrays)
        birth = np.array([self._patients[p][0] for p in rows], dtype=np.float64)
        sex = np.array([self._patients[p][1] for p in rows], dtype=np.float64)
        onset = np.array([self._onset.get(p, np.nan) for p in rows], dtype=np.float64)
        keep = ~np.isnan(index)
        report.dropped_patients["no_index_date"] += int((~keep).sum())
        born_after = keep & (birth > index)
        report.dropped_patients["born_after_index"] += int(born_after.sum())
        keep &= ~born_after
        horizon = index + spec.label.horizon_days
        y_all = (onset <= horizon).astype(np.int32)  # NaN onset compares False
        if spec.label.exclude_prevalent:
            prevalent = keep & (onset <= index)
            report.dropped_patients["prevalent_at_index"] += int(prevalent.sum())
            keep &= ~prevalent
        for k in [k for k, c in report.dropped_patients.items() if c == 0]:
            del report.dropped_patients[k]

        cols: list[npt.NDArray[np.float64]] = []
        names: list[str] = []
        units: list[str | None] = []
        if spec.demographics.age:
            cols.append((index - birth) / DAYS_PER_YEAR)
            names.append("age")
            units.append("a")
        if spec.demographics.sex:
            cols.append(sex)
            names.append("sex_male")
            units.append(None)
        chan_arrays = dict(zip((id(c) for c in self._channels), arrays, strict=True))
        for defn, ch in self._features:
            P, T, V = chan_arrays[id(ch)]
            window = defn.window_days or spec.lookback_days
            cols.append(aggregate(P, T, V, index, window, defn.aggregation, n))
            names.append(defn.name)
            units.append("1" if defn.aggregation == "count" else defn.unit)
        raw = np.stack(cols, axis=1) if cols else np.zeros((n, 0))
        raw = raw[keep]
        can_miss = [u != "1" for u in units]  # counts are never missing
        X, ind_names = impute(raw, names, spec.imputation.strategy, spec.imputation.indicators, can_miss)
        kept_ids = [p for p, k in zip(rows, keep.tolist(), strict=True) if k]
        table = FeatureTable(
            X=X.astype(np.float32),
            y=y_all[keep],
            columns=names + ind_names,
            units=units + [None] * len(ind_names),
            patient_ids=kept_ids,
            index_days=index[keep],
            spec_hash=spec.spec_hash(),
            spec_name=spec.name,
            label_name=spec.label.name,
            report=report,
        )
        if report.total_rejected:
            log.warning(
                "feature table %s: %d rows, %d resources rejected %s",
                spec.name,
                table.n_rows,
                report.total_rejected,
                dict(report.rejected),
            )
        return table

    def _index_days(
        self, rows: list[str], arrays: list[tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any]]]
    ) -> npt.NDArray[np.float64]:
        rule = self.spec.index_date
        n = len(rows)
        if rule.rule == "fixed":
            assert rule.date is not None
            return np.full(n, date_to_days(rule.date), dtype=np.float64)
        last = np.full(n, -np.inf)
        for P, T, _ in arrays:
            if len(P):
                np.maximum.at(last, P, T)
        last[np.isinf(last)] = np.nan
        return last - rule.offset_days


def parse_times(raw: list[str]) -> npt.NDArray[np.float64]:
    """FHIR date/dateTime strings to days since the epoch, NaN where a string is not one.

    One vectorised numpy parse covers the usual UTC forms ("...Z", dates, partial dates); numpy refuses
    offsets like +02:00 and anything malformed, and then each string goes through to_days."""
    if not raw:
        return np.empty(0, dtype=np.float64)
    naive = [s[:-1] if s[-1:] == "Z" else s for s in raw]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # numpy only warns about offsets: take the exact path for them
            us = np.array(naive, dtype="datetime64[us]").astype(np.int64)
        return us.astype(np.float64) / 86_400_000_000.0
    except (ValueError, OverflowError, UserWarning, DeprecationWarning):
        out = [to_days(s) for s in raw]
        return np.array([np.nan if d is None else d for d in out], dtype=np.float64)


def aggregate(
    P: npt.NDArray[np.int64],
    T: npt.NDArray[np.float64],
    V: npt.NDArray[np.float64],
    index: npt.NDArray[np.float64],
    window_days: float,
    how: str,
    n: int,
) -> npt.NDArray[np.float64]:
    """One column from records (row P, time T, value V) sorted by (P, T, V): values with
    index - window < T <= index are aggregated per row; rows without any get NaN (count: 0)."""
    if len(P):
        ix = index[P]
        lo = ix - window_days
        m = (lo < T) & (ix >= T)
        P, V = P[m], V[m]
    counts = np.bincount(P, minlength=n).astype(np.float64)
    if how == "count":
        return counts
    out = np.full(n, np.nan)
    if not len(P):
        return out
    has = counts > 0
    if how == "mean":
        out[has] = np.bincount(P, weights=V, minlength=n)[has] / counts[has]
    elif how == "latest":
        last = np.flatnonzero(np.r_[P[1:] != P[:-1], True])  # sorted by (P, T, V): last of each run
        out[P[last]] = V[last]
    elif how == "min":
        first = np.flatnonzero(np.r_[True, P[1:] != P[:-1]])
        out[P[first]] = np.minimum.reduceat(V, first)
    elif how == "max":
        first = np.flatnonzero(np.r_[True, P[1:] != P[:-1]])
        out[P[first]] = np.maximum.reduceat(V, first)
    else:
        raise ValueError(f"unknown aggregation {how!r}")
    return out


def impute(
    raw: npt.NDArray[np.float64],
    names: list[str],
    strategy: str,
    indicators: bool,
    can_miss: list[bool] | None = None,
) -> tuple[npt.NDArray[np.float64], list[str]]:
    """Fill NaN by column mean (or zero); append a 0/1 `<name>_missing` column for each column that can be
    missing (can_miss), whether or not this site has gaps, so every site gets the same columns."""
    X = raw.copy()
    miss = np.isnan(X)
    ind_names: list[str] = []
    ind_cols: list[npt.NDArray[np.float64]] = []
    for j, name in enumerate(names):
        col = miss[:, j]
        fill = float(X[~col, j].mean()) if strategy == "mean" and (~col).any() else 0.0
        X[col, j] = fill
        if indicators and (can_miss is None or can_miss[j]):
            ind_names.append(f"{name}_missing")
            ind_cols.append(col.astype(np.float64))
    if ind_cols:
        X = np.concatenate([X, np.stack(ind_cols, axis=1)], axis=1)
    return X, ind_names


def build_feature_table(
    resources: Iterable[dict[str, Any]] | Any,
    spec: FeatureSpec,
    *,
    strict: bool = False,
    report: IngestReport | None = None,
    workers: int | None = None,
) -> FeatureTable:
    """Build a FeatureTable from a ResourceSource (anything with iter_resources) or an iterable of dicts.

    strict=True validates every resource that feeds the table with fhir.resources R4B; that is CPU-bound,
    so it runs in `workers` processes (default: one per CPU; 1 = in this process)."""
    builder = FeatureBuilder(spec, strict=strict and workers == 1, report=report)
    if hasattr(resources, "iter_resources"):
        resources = resources.iter_resources(USED_TYPES, report=builder.report)
    n = workers if workers is not None else (os.cpu_count() or 1)
    if strict and n > 1:
        _add_validated_in_parallel(builder, resources, n)
    else:
        builder.add_all(resources)
    return builder.build()


def _validate_batch(batch: list[dict[str, Any]]) -> list[str | None]:
    return [v.r4b_errors(r) for r in batch]


def _add_validated_in_parallel(builder: FeatureBuilder, resources: Iterable[dict[str, Any]], workers: int) -> None:
    """Strict mode on several cores: resources the spec uses are validated in batches by a process pool
    (a bounded number in flight, so memory stays flat) and fed to the builder as results come back."""
    batch_size = 256
    pending: deque[tuple[list[dict[str, Any]], Future[list[str | None]]]] = deque()

    def drain_one() -> None:
        batch, fut = pending.popleft()
        for res, err in zip(batch, fut.result(), strict=True):
            if err is None:
                builder.add_all((res,))
            else:
                builder.report.reject(v.INVALID_RESOURCE, f"{res.get('resourceType')}/{res.get('id')}: {err}")

    with ProcessPoolExecutor(max_workers=workers) as pool:
        batch: list[dict[str, Any]] = []
        for res in resources:
            if not builder.uses(res):
                builder.add_all((res,))  # ignored or rejected without validation, as in one process
                continue
            batch.append(res)
            if len(batch) >= batch_size:
                pending.append((batch, pool.submit(_validate_batch, batch)))
                batch = []
                if len(pending) > 2 * workers:
                    drain_one()
        if batch:
            pending.append((batch, pool.submit(_validate_batch, batch)))
        while pending:
            drain_one()
