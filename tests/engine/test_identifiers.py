"""User ids and keys refuse every invisible character; metadata refuses deep nesting
(issue 30). Through the engine, on a real SQLite file: refused, and nothing changes."""

from __future__ import annotations

import sys
import unicodedata
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from creditworker import CreditService
from creditworker.contract.credits import (
    _CONTROL_CHARACTER,
    _INVISIBLE_CHARACTER,
    MAX_METADATA_DEPTH,
    AddCredits,
    _check_identifier,
    _check_text,
    parse,
)
from creditworker.contract.errors import UnknownUser, ValidationFailed

REFUSED_USER_IDS = {
    "NUL": "a\x00b",
    "C1 next line": "a\x85b",
    "C1 control sequence introducer": "a\x9bb",
    "delete": "a\x7fb",
    "right-to-left override": "admin\u202egnp.exe",
    "left-to-right override": "a\u202db",
    "right-to-left isolate": "a\u2067b",
    "pop directional isolate": "a\u2069b",
    "right-to-left mark": "a\u200fb",
    "zero-width space": "al\u200bice",
    "zero-width joiner": "al\u200dice",
    "zero-width non-joiner": "al\u200cice",
    "word joiner": "a\u2060b",
    "byte order mark": "\ufeffalice",
    "soft hyphen": "al\xadice",
    "arabic letter mark": "a\u061cb",
    "tag character": "a\U000e0041b",
}
ACCEPTED_USER_IDS = ["alice", "bob@example.com", "team/42", "Zoë", "名前", "user 1", "a😀b"]


@pytest.fixture
def credits(tmp_path: Path) -> CreditService:
    return CreditService(f"sqlite:///{tmp_path / 'ids.db'}")


@pytest.mark.parametrize("user_id", list(REFUSED_USER_IDS.values()), ids=list(REFUSED_USER_IDS))
def test_a_user_id_with_an_invisible_character_is_refused_and_changes_nothing(
    credits: CreditService, user_id: str
) -> None:
    with pytest.raises(ValidationFailed, match="control or format characters"):
        credits.add_credits(user_id, 10)
    seen_as = _INVISIBLE_CHARACTER.sub("", user_id)  # the name it would pass for
    with pytest.raises(UnknownUser):
        credits.get_user_credits_info(seen_as)


@pytest.mark.parametrize("user_id", ACCEPTED_USER_IDS)
def test_visible_user_ids_of_any_script_are_accepted(credits: CreditService, user_id: str) -> None:
    assert credits.add_credits(user_id, 10).balance_after == 10


def test_an_idempotency_key_refuses_invisible_characters_too() -> None:
    with pytest.raises(ValidationFailed, match="idempotency_key"):
        parse(AddCredits, {"user_id": "alice", "amount": 1, "idempotency_key": "k\u200b1"})


def test_the_refused_class_covers_every_control_and_format_character() -> None:
    missing = [hex(code) for code in range(sys.maxunicode + 1)
               if unicodedata.category(chr(code)) in ("Cc", "Cf")
               and not _INVISIBLE_CHARACTER.match(chr(code))]
    assert missing == []


def _accepted(check: Callable[[str], str], value: str) -> bool:
    try:
        check(value)
    except ValueError:
        return False
    return True


@given(st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=12)
       | st.sampled_from(["a\x00b", "\x1f", "a\x7f", "\tx", "x\n", "a b", "~", " ", ""]))
def test_ascii_text_is_judged_as_the_character_classes_judge_it(value: str) -> None:
    """ASCII text takes a shorter path (`str.isprintable`) than the classes' search: it must
    refuse exactly what they refuse."""
    assert _accepted(_check_text, value) == (_CONTROL_CHARACTER.search(value) is None)
    assert _accepted(_check_identifier, value) == (
        value == value.strip() and _INVISIBLE_CHARACTER.search(value) is None)


def nested(depth: int) -> dict[str, object]:
    value: dict[str, object] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def test_deep_metadata_is_a_validation_error_not_a_recursion_error(credits: CreditService) -> None:
    for depth in (MAX_METADATA_DEPTH + 1, 1000, 100_000):
        with pytest.raises(ValidationFailed, match=f"at most {MAX_METADATA_DEPTH} deep"):
            credits.add_credits("deep", 10, metadata=nested(depth))
        with pytest.raises(UnknownUser):
            credits.get_user_credits_info("deep")
    assert credits.add_credits("deep", 10, metadata=nested(MAX_METADATA_DEPTH)).balance_after == 10
