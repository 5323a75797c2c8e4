"""Feature tables from FHIR resources: the hot loop is plain dict access, the math is numpy on arrays.

`FeatureBuilder.add(resource)` extracts what the spec needs from one resource (Patient, Observation,
Condition) into flat per-feature arrays; `build()` applies the time rules of the spec (see featurespec.py),
aggregates, imputes and returns a `FeatureTable`. Records are sorted by (patient, value) before any
aggregation, so the table does not depend on the order the resources arrived in (search vs files).
"""

from __future__ import annotations

import csv
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import compress, islice
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt
import orjson

from . import validation as v
from .featurespec import FeatureSpec
from .timeutil import date_to_days, days_to_date, to_days
from .units import converter
from .validation import IngestReport

log = logging.getLogger("fhir_adapters.features")

USED_TYPES = ("Patient", "Observation", "Condition")
EXCLUDED_OBS_STATUS = frozenset({"entered-in-error", "cancelled"})
EXCLUDED_VERIFICATION = frozenset({"entered-in-error", "refuted"})
DAYS_PER_YEAR = 365.25
US_PER_DAY = 86_400_000_000.0


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

    __slots__ = ("analyte", "comp_codes", "convs", "is_count", "unconvertible", "unit")

    def __init__(
        self, comp_codes: frozenset[tuple[str, str]] | None, unit: str | None, analyte: str | None, is_count: bool
    ):
        self.comp_codes = comp_codes
        self.unit = unit
        self.analyte = analyte
        self.is_count = is_count
        # unit as written -> (scale, offset) to the canonical unit: one table look-up per distinct spelling,
        # not per value; spellings that do not convert are remembered apart (the happy path never sees them)
        self.convs: dict[object, tuple[float, float]] = {}
        self.unconvertible: set[object] = set()

    def value(self, obs: dict[str, Any]) -> float | str:
        """The observation's value in the canonical unit, or the reason it has none."""
        if self.is_count:
            return 1.0
        return self.quantity(obs.get("valueQuantity") if self.comp_codes is None else self.component(obs))

    def component(self, obs: dict[str, Any]) -> Any:
        """The valueQuantity of the observation's first component with one of this channel's codes."""
        codes: frozenset[tuple[str, str]] = self.comp_codes  # type: ignore[assignment]
        for comp in obs.get("component") or ():
            for c in comp["code"]["coding"]:  # loops, not any(genexpr): this runs once per blood pressure
                if (c.get("system"), c.get("code")) in codes:
                    return comp.get("valueQuantity")
        return None

    def quantity(self, q: Any) -> float | str:
        """A Quantity's value in the canonical unit, or the reason it has none."""
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
        conv = self.conversion(unit)
        if isinstance(conv, str):
            return conv
        return value * conv[0] + conv[1]

    def conversion(self, unit: object) -> tuple[float, float] | str:
        """(scale, offset) from `unit` to the canonical unit, or the reason there is none."""
        conv = self.convs.get(unit)
        if conv is not None:
            return conv
        if unit in self.unconvertible:
            return v.UNCONVERTIBLE_UNIT
        f = converter(unit, self.unit, self.analyte) if self.unit else None  # type: ignore[arg-type]
        if f is None:
            self.unconvertible.add(unit)
            return v.UNCONVERTIBLE_UNIT
        conv = self.convs[unit] = (f.scale, f.offset)
        return conv


# What the reference path makes of one Observation (see FeatureBuilder._extract).
_IGNORED = ("ignored",)
_GATED = ("gated",)  # refused by strict validation, which counted it
_OBS_FIELDS = 5  # see FeatureBuilder._obs
_Extracted = tuple[Any, ...]  # _IGNORED, _GATED, ("reject", reason, detail) or ("ok", id, patient, time, route, values)


class FeatureBuilder:
    """Streams resources in, builds one FeatureTable. strict=True validates used resources with R4B.

    Accepted Observations are kept in one flat list (see `_obs`): id, patient (index into `_pid_index`),
    raw effective time, route (which channels its code feeds) and the value for the route's first channel;
    the values for a route's other channels go to `_extra_values`, in order. build() finds duplicates,
    parses the times and aggregates, all with numpy.

    Each Observation first takes the happy path in add_all: plain subscripts (much cheaper than .get calls
    in CPython) and no side effects until it is kept. Anything off that path (a missing element, another
    type, a reason to reject, several channels...) is redone by `_extract`, the reference reading, so both
    give the same table and the same report (tests/fhir/test_fast_path.py checks that)."""

    def __init__(self, spec: FeatureSpec, *, strict: bool = False, report: IngestReport | None = None) -> None:
        self.spec = spec
        self.report = report if report is not None else IngestReport()
        self._gate: Callable[[dict[str, Any]], bool] | None = v.strict_check(self.report) if strict else None
        channels: dict[tuple[Any, ...], _Channel] = {}
        self._features: list[tuple[Any, _Channel]] = []
        chans_of_code: dict[tuple[str, str], list[_Channel]] = {}
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
                    chans_of_code.setdefault((c.system, c.code), []).append(ch)
            self._features.append((f, ch))
        self._channels = list(channels.values())
        # (system, code) -> (route id, the channels that code feeds, the happy path's channel: the only one,
        # when it is not a count, else None)
        self._routes: list[tuple[_Channel, ...]] = []
        self._by_code: dict[tuple[str, str], tuple[int, tuple[_Channel, ...], _Channel | None]] = {}
        for code_key, chans in chans_of_code.items():
            route = tuple(chans)
            if route not in self._routes:
                self._routes.append(route)
            single = chans[0] if len(chans) == 1 and not chans[0].is_count else None
            self._by_code[code_key] = (self._routes.index(route), route, single)
        # the happy path looks codes up by the code string alone (no tuple to build and hash), then checks the
        # system; a code string that two systems share maps to None and takes the reference path
        self._by_code_only: dict[str, tuple[str, int, _Channel] | None] = {}
        for (system, code), (route_id, _, one) in self._by_code.items():
            self._by_code_only[code] = None if code in self._by_code_only or one is None else (system, route_id, one)
        # one flat list, _OBS_FIELDS entries per kept Observation (one extend() per record is much cheaper
        # than an append per field): id, pid index, raw effective time (parsed in bulk by build(), see
        # parse_times), route, value for the route's first channel
        self._obs: list[Any] = []
        self._extra_values: list[float] = []
        lab = spec.label
        self._label_exact = {(c.system, c.code) for c in lab.codes if c.system not in lab.prefix_systems}
        self._label_prefix = [(c.system, c.code) for c in lab.codes if c.system in lab.prefix_systems]
        self._pid_index: dict[str, int] = {}
        self._ref_pid: dict[object, int] = {}  # subject reference -> pid index, -1 when not a Patient
        self._patients: dict[str, tuple[float, float]] = {}  # id -> (birth days or nan, sex_male or nan)
        self._onset: dict[str, float] = {}  # id -> earliest onset of a label condition

    def uses(self, res: dict[str, Any]) -> bool:
        """Whether `res` would feed the table (strict mode validates exactly these)."""
        rtype = res.get("resourceType")
        try:
            if rtype == "Patient":
                return True
            if rtype == "Observation":
                return any((c.get("system"), c.get("code")) in self._by_code for c in res["code"]["coding"])
            if rtype == "Condition":
                return self._has_label_code((res.get("code") or {}).get("coding") or ())
        except (AttributeError, TypeError, KeyError):
            return True  # malformed: let validation say why
        return False

    # ---------------- hot loop ----------------

    def add_json(self, raw: bytes | str) -> None:
        res = v.parse_json(raw, self.report)
        if res is not None:
            self.add(res)

    def add(self, res: dict[str, Any]) -> None:
        self.add_all((res,))

    def add_all(self, resources: Iterable[dict[str, Any]]) -> FeatureBuilder:
        """Feed resources (dicts) in."""
        return self._ingest(resources, text=False)

    def add_ndjson(self, lines: Iterable[bytes]) -> FeatureBuilder:
        """Feed ndjson text in (e.g. a Bulk file object), each line parsed with orjson in the hot loop itself:
        what iter_ndjson + add_all do, without a generator between them. As in iter_ndjson, blank lines are
        skipped, bad lines counted, and resources of other types than USED_TYPES left out."""
        return self._ingest(lines, text=True)

    def _ingest(self, items: Iterable[Any], *, text: bool) -> FeatureBuilder:
        """The hot loop: see the class docstring for the happy path."""
        report, by_code, ref_pid = self.report, self._by_code_only, self._ref_pid
        keep = self._obs.extend
        excluded, add_other, gate = EXCLUDED_OBS_STATUS, self._add_other, self._gate
        commit, extract, loads, pid_of_ref = self._commit, self._extract, orjson.loads, self._pid_of_ref
        for r in items:
            if text:  # one ndjson line (sources.iter_ndjson does the same for dict consumers)
                line = r
                if len(line) < 3 and not line.strip():  # blank (strip() would copy every line)
                    continue
                try:
                    r = loads(line)
                except orjson.JSONDecodeError:
                    report.reject(v.MALFORMED_JSON, line[:120].decode("utf-8", "replace"))
                    continue
                if r.__class__ is not dict:
                    report.reject(v.NOT_AN_OBJECT, str(r)[:120])
                    continue
                rtype = r.get("resourceType")
                if rtype != "Observation":
                    if rtype in USED_TYPES:
                        add_other(r)
                    elif "resourceType" not in r:
                        report.reject(v.MISSING_RESOURCE_TYPE, line[:120].decode("utf-8", "replace"))
                    continue
            elif r.get("resourceType") != "Observation":
                add_other(r)
                continue
            try:
                if gate is not None:
                    raise LookupError  # strict: validated on the reference path
                coding = r["code"]["coding"]
                if coding.__class__ is not list:
                    raise LookupError
                c = coding[0]
                code = c["code"]
                if code not in by_code and len(coding) == 1 and code.__class__ is str:
                    report.ignored += 1  # not a spec code, in any system
                    continue
                system, route, ch = by_code[code]  # type: ignore[misc]
                if system != c["system"]:
                    raise LookupError  # another system's code: the reference path ignores it or finds another
                if ch.comp_codes is None:
                    q = r["valueQuantity"]
                else:  # the first component, when its first coding is the channel's (else the reference path)
                    comps = r["component"]
                    comp_coding = comps[0]["code"]["coding"]
                    cc = comp_coding[0]
                    if (
                        comps.__class__ is not list
                        or comp_coding.__class__ is not list
                        or (cc["system"], cc["code"]) not in ch.comp_codes
                    ):
                        raise LookupError
                    q = comps[0]["valueQuantity"]
                value = q["value"]
                conv = ch.convs[q["code"]]
                when = r["effectiveDateTime"]
                ref = r["subject"]["reference"]
                p = ref_pid[ref] if ref in ref_pid else pid_of_ref(ref)  # a patient's first: resolve it here
                if (
                    r["status"] in excluded
                    or p < 0
                    or when.__class__ is not str
                    or not when
                    or (value.__class__ is not float and value.__class__ is not int)
                ):
                    raise LookupError  # a reason to reject, or not the usual shape: the reference path says
                rid = r["id"]
            except (LookupError, TypeError, AttributeError):
                commit(extract(r))
                continue
            keep((rid, p, when, route, value * conv[0] + conv[1]))  # duplicates: found in build(), all at once
        return self

    def _extract(self, r: dict[str, Any]) -> _Extracted:
        """The reference reading of one Observation: what it feeds, or why not. The order of the checks
        decides which reason a bad one is rejected for; duplicates are left to _commit."""
        rid = r.get("id")
        try:
            hit = None
            for c in r["code"]["coding"]:
                hit = self._by_code.get((c.get("system"), c.get("code")))
                if hit is not None:
                    break
            if hit is None:
                return _IGNORED
            if self._gate is not None and not self._gate(r):
                return _GATED
            if r.get("status") in EXCLUDED_OBS_STATUS:
                return ("reject", v.STATUS_EXCLUDED, f"Observation/{rid}")
            subject = r.get("subject")
            p = self._pid_of_ref(subject.get("reference") if subject else None)
            if p < 0:
                return ("reject", v.NO_SUBJECT, f"Observation/{rid}")
            when = r.get("effectiveDateTime") or r.get("effectiveInstant")
            if when is None:
                period = r.get("effectivePeriod")
                when = period.get("start") if period else r.get("issued")
            if when.__class__ is not str:
                return ("reject", v.NO_EFFECTIVE_TIME, f"Observation/{rid}")
            values = [ch.value(r) for ch in hit[1]]  # accepted or rejected as a whole
            for x in values:
                if x.__class__ is str:
                    return ("reject", x, f"Observation/{rid}")
            return ("ok", rid, p, when, hit[0], values)
        except (AttributeError, TypeError, KeyError, IndexError, OverflowError) as e:
            # structure that is not FHIR (a string where an object belongs...): count it, never crash
            return ("reject", v.INVALID_RESOURCE, f"Observation/{rid}: {e!r}")

    def _commit(self, res: _Extracted) -> None:
        """Count an extracted Observation, or keep it (duplicates are found in build())."""
        kind = res[0]
        if kind == "ok":
            _, rid, p, when, route, values = res
            self._obs.extend((rid, p, when, route, values[0]))
            if len(values) > 1:
                self._extra_values.extend(values[1:])
        elif kind == "reject":
            self.report.reject(res[1], res[2])
        elif kind == "ignored":
            self.report.ignored += 1

    def _pid_of_ref(self, ref: object) -> int:
        """The patient index a subject reference points to, -1 when it is not a Patient reference."""
        try:
            return self._ref_pid[ref]
        except KeyError:
            pass
        except TypeError:  # not a string: not a reference
            return -1
        # the common literal form first; _ref_id handles absolute, versioned and urn:uuid references
        if ref.__class__ is str and ref.startswith("Patient/") and ref.find("/", 8) < 0:
            pid: str | None = ref[8:]
        else:
            pid = _ref_id(ref)
        p = self._ref_pid[ref] = -1 if pid is None else self._pid(pid)
        return p

    def _add_other(self, res: dict[str, Any]) -> None:
        rtype = res.get("resourceType")
        try:
            if rtype == "Patient":
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
            self.report.reject(v.INVALID_RESOURCE, f"{rtype}/{res.get('id')}: {e!r}")

    def _pid(self, pid: str) -> int:
        p = self._pid_index.get(pid)
        if p is None:
            p = self._pid_index[pid] = len(self._pid_index)
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

    def _has_label_code(self, codings: Iterable[Any]) -> bool:
        """Whether a coding is a label code (exact, or by prefix in the prefix systems). Plain loops: this
        runs for every Condition."""
        for c in codings:
            system, code = c.get("system"), c.get("code")
            if (system, code) in self._label_exact:
                return True
            if isinstance(code, str):
                for s, prefix in self._label_prefix:
                    if system == s and code.startswith(prefix):
                        return True
        return False

    def _add_condition(self, cond: dict[str, Any]) -> None:
        if not self._has_label_code((cond.get("code") or {}).get("coding") or ()):
            self.report.ignored += 1
            return
        if self._gate is not None and not self._gate(cond):
            return
        rid = cond.get("id")
        ver = cond.get("verificationStatus")
        for c in (ver.get("coding") or ()) if ver else ():
            if c.get("code") in EXCLUDED_VERIFICATION:
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
        obs = self._obs
        ids, times = obs[0::_OBS_FIELDS], obs[2::_OBS_FIELDS]
        obs_pid = np.asarray(obs[1::_OBS_FIELDS], dtype=np.int64)
        n_obs = len(ids)
        kept = self._first_of_each_id(ids)  # duplicates out first: they never reach the time check
        T = np.full(n_obs, np.nan)
        T[kept] = parse_times(times if kept.all() else list(compress(times, kept.tolist())))
        timed = ~np.isnan(T)
        for i in np.flatnonzero(kept & ~timed).tolist():
            report.reject(v.NO_EFFECTIVE_TIME, f"Observation with effective time {times[i]!r}")
        report.accepted["Observation"] += int(timed.sum())
        obs_per_pid = np.bincount(obs_pid[timed], minlength=n_all)
        # patients with Observations but no Patient resource, in the order of their first Observation
        first_obs = np.full(n_all, n_obs, dtype=np.int64)
        np.minimum.at(first_obs, obs_pid[kept], np.flatnonzero(kept))
        orphans = [pid for pid, p in self._pid_index.items() if to_row[p] < 0 and obs_per_pid[p]]
        orphans.sort(key=lambda pid: first_obs[self._pid_index[pid]])
        for pid in orphans:
            n_obs = int(obs_per_pid[self._pid_index[pid]])
            report.reject(v.UNKNOWN_PATIENT, f"{n_obs} Observations of Patient/{pid}, which is not in the data")
            report.rejected[v.UNKNOWN_PATIENT] += n_obs - 1
            report.accepted["Observation"] -= n_obs
        P_obs = to_row[obs_pid]
        arrays = self._channel_records(P_obs, T, timed & (P_obs >= 0))
        n = len(rows)
        index = self._index_days(rows, list(arrays.values()))
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
        for defn, ch in self._features:
            P, T, V = arrays[ch]
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

    def _first_of_each_id(self, ids: list[object]) -> npt.NDArray[np.bool_]:
        """Which kept Observations are not duplicates: the first of each id, in arrival order (one C-level
        set() when there are none, the usual case; an ordered pass otherwise). Observations without an id
        are never duplicates."""
        kept = np.ones(len(ids), dtype=bool)
        try:
            distinct = set(ids)
            n_none = ids.count(None) if None in distinct else 0
            if len(distinct) + max(n_none - 1, 0) == len(ids):
                return kept
        except TypeError:  # an id that cannot be hashed: the ordered pass says which
            pass
        seen: set[object] = set()
        for i, rid in enumerate(ids):
            if rid is None:
                continue
            try:
                if rid in seen:
                    self.report.reject(v.DUPLICATE, f"Observation/{rid}")
                    kept[i] = False
                    continue
            except TypeError as e:
                self.report.reject(v.INVALID_RESOURCE, f"Observation/{rid}: {e!r}")
                kept[i] = False
                continue
            seen.add(rid)
        return kept

    def _channel_records(
        self, P_obs: npt.NDArray[np.int64], T_obs: npt.NDArray[np.float64], use: npt.NDArray[np.bool_]
    ) -> dict[_Channel, tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64]]]:
        """Each channel's records (row, time, value) from the observations in `use`, sorted by (row, value)
        so that aggregates do not depend on arrival order."""
        route = np.asarray(self._obs[3::_OBS_FIELDS], dtype=np.int64)
        first = np.asarray(self._obs[4::_OBS_FIELDS], dtype=np.float64)
        extra = np.asarray(self._extra_values, dtype=np.float64)
        n_more = np.array([len(r) - 1 for r in self._routes], dtype=np.int64)[route]
        extra_start = np.cumsum(n_more) - n_more  # where each observation's other values start in `extra`
        parts: dict[_Channel, list[tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]]] = {
            ch: [] for ch in self._channels
        }
        for r, chans in enumerate(self._routes):
            s = np.flatnonzero(use & (route == r))
            for k, ch in enumerate(chans):
                parts[ch].append((s, first[s] if k == 0 else extra[extra_start[s] + k - 1]))
        out = {}
        for ch, got in parts.items():  # a channel fed by several routes (codes) gathers them all
            seqs = np.concatenate([i for i, _ in got]) if got else np.empty(0, np.int64)
            V = np.concatenate([x for _, x in got]) if got else np.empty(0, np.float64)
            P, T = P_obs[seqs], T_obs[seqs]
            order = order_by_patient_value(P, V)
            out[ch] = (P[order], T[order], V[order])
        return out

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


# The fixed forms parse_times reads with numpy, by length: where their separators are (the rest are digits,
# except the offset's sign at 19 in the 25-character form).
_SEPARATORS: dict[int, dict[int, int]] = {10: {4: ord("-"), 7: ord("-")}}
_SEPARATORS[19] = {**_SEPARATORS[10], 10: ord("T"), 13: ord(":"), 16: ord(":")}
_SEPARATORS[20] = {**_SEPARATORS[19], 19: ord("Z")}
_SEPARATORS[25] = {**_SEPARATORS[19], 22: ord(":")}
_DAYS_IN_MONTH = np.array([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31], dtype=np.int32)


def parse_times(raw: list[str]) -> npt.NDArray[np.float64]:
    """FHIR date/dateTime strings to days since the epoch (to_days, vectorised), NaN where one is not valid.

    The forms servers write — YYYY-MM-DD, and YYYY-MM-DDThh:mm:ss followed by nothing, Z or +hh:mm/-hh:mm —
    are read from the bytes with numpy and range-checked; any other string (fractional seconds, partial
    dates, anything odd) goes through to_days one at a time. Both give whole microseconds / 86,400,000,000,
    so a time has the same value whichever way it was read."""
    n = len(raw)
    out = np.full(n, np.nan)
    if not n:
        return out
    buf = np.frombuffer(("\n".join(raw) + "\n").encode("utf-8", "surrogatepass"), dtype=np.uint8)
    ends = np.flatnonzero(buf == 10)
    if len(ends) == n:  # no string holds a newline, so the i-th line is raw[i]
        starts = np.empty(n, dtype=np.int64)
        starts[0] = 0
        starts[1:] = ends[:-1] + 1
        size = ends - starts
        for width in _SEPARATORS:
            rows = np.flatnonzero(size == width)
            if len(rows) == n:  # all one form: the buffer is a (n, width + 1) table
                out[:] = _parse_fixed(buf.reshape(n, width + 1), width)
            elif len(rows):
                out[rows] = _parse_fixed(buf[starts[rows, None] + np.arange(width)], width)
    for i in np.flatnonzero(np.isnan(out)).tolist():
        t = to_days(raw[i])
        if t is not None:
            out[i] = t
    return out


def _parse_fixed(chars: npt.NDArray[np.uint8], width: int) -> npt.NDArray[np.float64]:
    """Days since the epoch for rows of `width` bytes in one of parse_times' fixed forms, else NaN."""
    c = np.ascontiguousarray(chars[:, :width].T)  # one contiguous row per character position
    d = c - np.uint8(48)  # digit values; a byte that is not a digit wraps round to more than 9
    seps = _SEPARATORS[width]
    digits = [i for i in range(width) if i not in seps and not (width == 25 and i == 19)]
    ok = (d[digits] <= 9).all(axis=0)
    ok &= (c[list(seps)] == np.array(list(seps.values()), dtype=np.uint8)[:, None]).all(axis=0)
    # two-digit numbers at once: year hi, year lo, month, day, then hh, mm, ss, and the offset's hh, mm
    starts = [0, 2, 5, 8] + ([11, 14, 17] if width > 10 else []) + ([20, 23] if width == 25 else [])
    two = d[starts].astype(np.int32) * 10 + d[[i + 1 for i in starts]]
    y, mo, day = two[0] * 100 + two[1], two[2], two[3]
    leap = (y % 4 == 0) & ((y % 100 != 0) | (y % 400 == 0))
    ok &= (y >= 1) & (mo >= 1) & (mo <= 12) & (day >= 1)
    ok &= day <= _DAYS_IN_MONTH[np.clip(mo, 0, 12)] + ((mo == 2) & leap)
    # days from the civil date (proleptic Gregorian), with years starting in March so a leap day comes last
    ym = y - (mo <= 2)
    era = ym // 400
    yoe = ym - era * 400
    doy = (153 * np.where(mo > 2, mo - 3, mo + 9) + 2) // 5 + day - 1
    secs = (era * 146_097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719_468).astype(np.int64) * 86_400
    if width > 10:
        hh, mi, ss = two[4], two[5], two[6]
        ok &= (hh <= 23) & (mi <= 59) & (ss <= 59)
        secs += hh * 3600 + mi * 60 + ss
    if width == 25:
        east = c[19] == ord("+")
        oh, om = two[7], two[8]
        ok &= (east | (c[19] == ord("-"))) & (oh <= 23) & (om <= 59)
        secs -= np.where(east, 1, -1) * (oh * 3600 + om * 60)
    return np.where(ok, (secs * 1_000_000).astype(np.float64) / US_PER_DAY, np.nan)


def order_by_patient_value(P: npt.NDArray[np.int64], V: npt.NDArray[np.float64]) -> npt.NDArray[np.intp]:
    """The order that sorts records by (patient, value). Sums then add each patient's values in one order
    whatever order the records came in, so a mean is bit-identical from any source; records that tie on
    both are interchangeable for every aggregate. Patients are sorted with stable radix passes over 16-bit
    digits (numpy's stable sort of uint16 is a radix sort), much faster than a lexsort."""
    order = np.argsort(V)
    top = int(P.max()) if len(P) else 0
    shift = 0
    while True:
        digit = ((P[order] >> shift) & 0xFFFF).astype(np.uint16)
        order = order[np.argsort(digit, kind="stable")]
        shift += 16
        if top >> shift == 0:
            return order


def aggregate(
    P: npt.NDArray[np.int64],
    T: npt.NDArray[np.float64],
    V: npt.NDArray[np.float64],
    index: npt.NDArray[np.float64],
    window_days: float,
    how: str,
    n: int,
) -> npt.NDArray[np.float64]:
    """One column from records (row P >= 0, time T, value V) sorted by (P, V) (order_by_patient_value):
    values with index - window < T <= index are aggregated per row; rows without any get NaN (count: 0).
    `latest` is the value at the latest time, the largest of those when several share that time."""
    if len(P):
        ix = index[P]
        lo = ix - window_days
        m = (lo < T) & (ix >= T)
        P, T, V = P[m], T[m], V[m]
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
        t_max = np.full(n, -np.inf)
        np.maximum.at(t_max, P, T)
        at = np.flatnonzero(t_max[P] == T)  # records at their row's latest time, by (P, V)
        last = at[np.r_[P[at][1:] != P[at][:-1], True]]  # the last of each row's run: the largest value
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
    A source of ndjson files (NdjsonDirSource: iter_files) is read as text, each line parsed in the builder's
    own loop.

    strict=True validates every resource that feeds the table with fhir.resources R4B (FeatureBuilder.uses:
    every Patient, the Observations with a spec code, the Conditions with a label code); that is CPU-bound,
    so it runs in `workers` processes (default: one per CPU; 1 = in this process)."""
    n = workers if workers is not None else (os.cpu_count() or 1)
    builder = FeatureBuilder(spec, strict=strict and n == 1, report=report)
    parallel = strict and n > 1
    if hasattr(resources, "iter_files"):
        files = resources.iter_files(USED_TYPES)
        if parallel:
            _add_validated_lines_in_parallel(builder, files, n)
        else:
            for f in files:
                builder.add_ndjson(f)
        return builder.build()
    if hasattr(resources, "iter_resources"):
        resources = resources.iter_resources(USED_TYPES, report=builder.report)
    if parallel:
        _add_validated_in_parallel(builder, resources, n)
    else:
        builder.add_all(resources)
    return builder.build()


_BATCH = 256  # resources per task sent to a validation worker
_line_worker: FeatureBuilder | None = None  # in each worker process: says which resources the spec uses


def _warm_r4b() -> None:
    """Build the R4B models once; a pool forked afterwards shares them instead of building them per worker."""
    for rtype in USED_TYPES:
        v._r4b_model(rtype)


def _start_line_worker(spec_json: str) -> None:
    global _line_worker
    _warm_r4b()
    _line_worker = FeatureBuilder(FeatureSpec.model_validate_json(spec_json))


def _invalid_lines(lines: list[bytes]) -> list[tuple[int, str]]:
    """(position, detail) of each line whose resource the spec uses and that fails R4B validation. Lines that
    do not parse or are not used are left to the builder, which counts them as in the fast path."""
    assert _line_worker is not None
    bad = []
    for i, line in enumerate(lines):
        try:
            res = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if res.__class__ is dict and res.get("resourceType") in USED_TYPES and _line_worker.uses(res):
            err = v.r4b_errors(res)
            if err is not None:
                bad.append((i, f"{res.get('resourceType')}/{res.get('id')}: {err}"))
    return bad


def _add_validated_lines_in_parallel(builder: FeatureBuilder, files: Iterable[IO[bytes]], workers: int) -> None:
    """Strict mode on ndjson text: workers get raw lines (cheap to send, unlike parsed dicts), parse them and
    validate those the spec uses; the builder then takes each batch's valid lines in order, as in one
    process. A bounded number of batches is in flight, so memory stays flat."""
    pending: deque[tuple[list[bytes], Future[list[tuple[int, str]]]]] = deque()

    def drain_one() -> None:
        batch, fut = pending.popleft()
        bad = fut.result()
        for _, detail in bad:
            builder.report.reject(v.INVALID_RESOURCE, detail)
        if bad:
            drop = {i for i, _ in bad}
            batch = [line for i, line in enumerate(batch) if i not in drop]
        builder.add_ndjson(batch)

    _warm_r4b()
    spec_json = builder.spec.model_dump_json()
    with ProcessPoolExecutor(max_workers=workers, initializer=_start_line_worker, initargs=(spec_json,)) as pool:
        for f in files:
            while batch := list(islice(f, _BATCH)):
                pending.append((batch, pool.submit(_invalid_lines, batch)))
                if len(pending) > 2 * workers:
                    drain_one()
        while pending:
            drain_one()


def _validate_batch(batch: list[dict[str, Any]]) -> list[str | None]:
    return [v.r4b_errors(r) for r in batch]


def _add_validated_in_parallel(builder: FeatureBuilder, resources: Iterable[dict[str, Any]], workers: int) -> None:
    """Strict mode on several cores: resources the spec uses are validated in batches by a process pool
    (a bounded number in flight, so memory stays flat) and fed to the builder as results come back."""
    pending: deque[tuple[list[dict[str, Any]], Future[list[str | None]]]] = deque()

    def drain_one() -> None:
        batch, fut = pending.popleft()
        valid = []
        for res, err in zip(batch, fut.result(), strict=True):
            if err is None:
                valid.append(res)
            else:
                builder.report.reject(v.INVALID_RESOURCE, f"{res.get('resourceType')}/{res.get('id')}: {err}")
        builder.add_all(valid)

    _warm_r4b()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        batch: list[dict[str, Any]] = []
        for res in resources:
            if not builder.uses(res):
                builder.add(res)  # ignored or rejected without validation, as in one process
                continue
            batch.append(res)
            if len(batch) >= _BATCH:
                pending.append((batch, pool.submit(_validate_batch, batch)))
                batch = []
                if len(pending) > 2 * workers:
                    drain_one()
        if batch:
            pending.append((batch, pool.submit(_validate_batch, batch)))
        while pending:
            drain_one()
