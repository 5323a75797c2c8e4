"""UCUM unit normalisation: a small table of affine conversions to one canonical unit per quantity.

Pure and table-driven: `convert(value, unit, canonical, analyte)` looks up (from, to) in the table, with
analyte-specific rows (molar <-> mass concentration depends on the molecule) taking precedence.
"""

from __future__ import annotations

from typing import NamedTuple

from .errors import UnitError

# Molar mass / 10 (mg/dL per mmol/L) for glucose: 180.156 g/mol.
GLUCOSE_MG_DL_PER_MMOL_L = 18.0156


class Affine(NamedTuple):
    scale: float
    offset: float = 0.0

    def apply(self, value: float) -> float:
        return value * self.scale + self.offset


# Spellings seen in the wild for the same UCUM unit (display strings, case variants).
ALIASES: dict[str, str] = {
    "mg/dl": "mg/dL",
    "mmol/l": "mmol/L",
    "kg": "kg",
    "kilogram": "kg",
    "g": "g",
    "lb": "[lb_av]",
    "lbs": "[lb_av]",
    "[lb_av]": "[lb_av]",
    "cm": "cm",
    "m": "m",
    "in": "[in_i]",
    "[in_i]": "[in_i]",
    "cel": "Cel",
    "°c": "Cel",
    "degc": "Cel",
    "[degf]": "[degF]",
    "°f": "[degF]",
    "degf": "[degF]",
    "/min": "/min",
    "{beats}/min": "/min",
    "beats/min": "/min",
    "kg/m2": "kg/m2",
    "kg/m^2": "kg/m2",
    "mm[hg]": "mm[Hg]",
    "%": "%",
    "umol/l": "umol/L",
    "1": "1",
    "{score}": "{score}",
}

# (from, to) -> affine map, valid for any analyte.
GENERIC: dict[tuple[str, str], Affine] = {
    ("[lb_av]", "kg"): Affine(0.45359237),
    ("kg", "[lb_av]"): Affine(1 / 0.45359237),
    ("g", "kg"): Affine(0.001),
    ("kg", "g"): Affine(1000.0),
    ("[in_i]", "cm"): Affine(2.54),
    ("cm", "[in_i]"): Affine(1 / 2.54),
    ("m", "cm"): Affine(100.0),
    ("cm", "m"): Affine(0.01),
    ("[degF]", "Cel"): Affine(5 / 9, -32 * 5 / 9),
    ("Cel", "[degF]"): Affine(9 / 5, 32.0),
}

# (analyte, from, to) -> affine map: conversions that need the molecule's molar mass.
ANALYTE: dict[tuple[str, str, str], Affine] = {
    ("glucose", "mmol/L", "mg/dL"): Affine(GLUCOSE_MG_DL_PER_MMOL_L),
    ("glucose", "mg/dL", "mmol/L"): Affine(1 / GLUCOSE_MG_DL_PER_MMOL_L),
    # creatinine: 113.12 g/mol -> 1 mg/dL = 88.42 umol/L
    ("creatinine", "umol/L", "mg/dL"): Affine(1 / 88.42),
    ("creatinine", "mg/dL", "umol/L"): Affine(88.42),
}


def canonical_unit(unit: str | None) -> str | None:
    """The UCUM spelling of `unit`, or None when it is not one we know."""
    if unit is None:
        return None
    u = unit.strip()
    if not u:
        return None
    return ALIASES.get(u.lower(), u if u in _KNOWN else None)


_KNOWN = frozenset(ALIASES.values()) | {u for pair in GENERIC for u in pair}


def converter(unit: str | None, target: str, analyte: str | None = None) -> Affine | None:
    """The affine map from `unit` to `target` (identity when equal), or None when not convertible."""
    if unit is not None and unit.strip() == target:
        return Affine(1.0)  # exact match needs no table entry (e.g. "10*3/uL")
    src = canonical_unit(unit)
    if src is None:
        return None
    if src == target:
        return Affine(1.0)
    if analyte is not None:
        hit = ANALYTE.get((analyte, src, target))
        if hit is not None:
            return hit
    return GENERIC.get((src, target))


def convert(value: float, unit: str | None, target: str, analyte: str | None = None) -> float:
    """Convert `value` from `unit` to `target`; raises UnitError when no conversion is known."""
    f = converter(unit, target, analyte)
    if f is None:
        raise UnitError(
            f"cannot convert unit {unit!r} to {target!r}" + (f" for {analyte}" if analyte else ""),
            hint="add the unit to fhir_adapters/units.py or fix the source data",
        )
    return f.apply(value)
