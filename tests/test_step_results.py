"""The typed step results that are a dataclass's ``to_dict()`` (cast, not built key by key) must
keep the dataclass's fields: mypy cannot see that cast, so a renamed or added field shows here."""

from __future__ import annotations

import dataclasses

import pytest

from freshnet.contest import DecisionDict, EvaluateResult
from freshnet.cycle import CurateResult, LabelCheckResult
from freshnet.data.batch import CurationReport
from freshnet.data.labels import LabelCheck
from freshnet.model.evaluate import Evaluation
from freshnet.model.policy import Decision
from freshnet.release import LedgerEntry
from freshnet.space.ledger import Entry


@pytest.mark.parametrize(
    ("typed", "cls"),
    [
        (CurateResult, CurationReport),
        (LabelCheckResult, LabelCheck),
        (EvaluateResult, Evaluation),
        (DecisionDict, Decision),
        (LedgerEntry, Entry),
    ],
    ids=lambda x: x.__name__,
)
def test_a_typed_result_has_exactly_the_fields_of_its_dataclass(typed: type, cls: type) -> None:
    keys = set(typed.__required_keys__) | set(typed.__optional_keys__)
    assert keys == {f.name for f in dataclasses.fields(cls)}
