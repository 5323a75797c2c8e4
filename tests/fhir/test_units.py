"""Unit conversion: the table, aliases, analyte-specific rows, refusals."""

from __future__ import annotations

import math

import pytest

from fhir_adapters.errors import UnitError
from fhir_adapters.units import GLUCOSE_MG_DL_PER_MMOL_L, canonical_unit, convert, converter


def test_glucose_mmol_to_mg_dl_uses_glucose_molar_mass() -> None:
    assert GLUCOSE_MG_DL_PER_MMOL_L == 18.0156
    assert convert(5.5, "mmol/L", "mg/dL", "glucose") == pytest.approx(5.5 * 18.0156)
    assert convert(99.0858, "mg/dL", "mmol/L", "glucose") == pytest.approx(5.5)


def test_molar_conversion_needs_the_analyte() -> None:
    # mmol/L -> mg/dL depends on the molecule: without an analyte there is no answer
    assert converter("mmol/L", "mg/dL") is None
    with pytest.raises(UnitError) as e:
        convert(5.5, "mmol/L", "mg/dL")
    assert e.value.code == "FHIR-008"


@pytest.mark.parametrize(
    ("value", "unit", "target", "expected"),
    [
        (150.0, "[lb_av]", "kg", 68.0388555),
        (68.0388555, "kg", "[lb_av]", 150.0),
        (70.0, "[in_i]", "cm", 177.8),
        (177.8, "cm", "[in_i]", 70.0),
        (98.6, "[degF]", "Cel", 37.0),
        (37.0, "Cel", "[degF]", 98.6),
        (-40.0, "[degF]", "Cel", -40.0),
        (1.8, "m", "cm", 180.0),
        (72.0, "kg", "kg", 72.0),
    ],
)
def test_generic_conversions(value: float, unit: str, target: str, expected: float) -> None:
    assert convert(value, unit, target) == pytest.approx(expected, rel=1e-9)


def test_round_trips_are_identity() -> None:
    for unit, target, analyte in [("[lb_av]", "kg", None), ("[degF]", "Cel", None), ("mmol/L", "mg/dL", "glucose")]:
        there = convert(12.34, unit, target, analyte)
        assert convert(there, target, unit, analyte) == pytest.approx(12.34, rel=1e-12)


def test_aliases_map_display_spellings_to_ucum() -> None:
    assert canonical_unit("lbs") == "[lb_av]"
    assert canonical_unit("mg/dl") == "mg/dL"
    assert canonical_unit("°F") == "[degF]"
    assert convert(10.0, "lb", "kg") == pytest.approx(4.5359237)


def test_unknown_and_incompatible_units_are_refused() -> None:
    assert converter("furlong", "cm") is None
    assert converter(None, "kg") is None
    assert converter("", "kg") is None
    assert converter("cm", "kg") is None  # known units, wrong dimension
    assert converter("mg/dL", "mmol/L", "sodium") is None  # no row for this analyte


def test_exact_unit_match_needs_no_table_entry() -> None:
    f = converter("10*3/uL", "10*3/uL")
    assert f is not None and f.apply(4.2) == 4.2
    assert not math.isnan(convert(1.0, "kg/m2", "kg/m2"))
