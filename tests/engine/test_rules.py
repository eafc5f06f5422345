"""The money rules in plain Python: no database, no ORM, the whole file well under a second."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from creditworker.contract.credits import MAX_BALANCE, LedgerEntry, OveragePolicy, Reservation
from creditworker.contract.errors import InsufficientCredits, ReservationNotActive, ValidationFailed
from creditworker.engine import rules
from creditworker.engine.results import entry_record, reservation_record

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)


def account(balance: int = 0, reserved: int = 0, threshold: int | None = None) -> rules.Account:
    return rules.Account("ann", balance, reserved, threshold, False, lots=[], lots_loaded=True)


def stored_lot(lot_id: int, remaining: int, *, priority: int = 0, expires_in_days: int | None = None) -> rules.Lot:
    expires_at = None if expires_in_days is None else NOW + timedelta(days=expires_in_days)
    return rules.Lot(lot_id, "ann", remaining, remaining, priority, expires_at, "purchase", NOW, f"lot-{lot_id}",
                     age=lot_id)


def with_lots(*lots: rules.Lot) -> rules.Account:
    holder = account(balance=sum(lot.remaining for lot in lots))
    holder.lots = sorted(lots, key=rules.draw_order)
    return holder


def remaining(holder: rules.Account) -> dict[int | None, int]:
    return {lot.id: lot.remaining for lot in holder.lots}


def test_grant_adds_a_lot_and_the_balance() -> None:
    holder = account()
    posting = rules.grant(holder, 100, at=NOW, key="g", priority=2, source="bonus")
    assert (holder.balance, holder.available) == (100, 100)
    assert (posting.kind, posting.amount, posting.balance_after) == ("add", 100, 100)
    assert posting.lot is not None and (posting.lot.remaining, posting.lot.priority) == (100, 2)
    assert holder.lots == [posting.lot]


def test_grant_pays_off_a_negative_balance_first() -> None:
    holder = account(balance=-30)
    posting = rules.grant(holder, 50, at=NOW, key="g")
    assert posting.lot is not None and posting.lot.remaining == 20
    assert holder.balance == 20


def test_grant_refuses_a_past_expiry_or_a_balance_above_the_maximum_and_changes_nothing() -> None:
    holder = account(balance=MAX_BALANCE - 5)
    with pytest.raises(ValidationFailed):
        rules.grant(holder, 6, at=NOW, key="g")
    with pytest.raises(ValidationFailed):
        rules.grant(holder, 1, at=NOW, key="g", expires_at=NOW)
    assert (holder.balance, holder.lots) == (MAX_BALANCE - 5, [])


def test_deduct_draws_lowest_priority_value_then_soonest_expiry_then_no_expiry_then_oldest() -> None:
    holder = with_lots(
        stored_lot(1, 10),
        stored_lot(2, 10, expires_in_days=30),
        stored_lot(3, 10, expires_in_days=2),
        stored_lot(4, 10, priority=-1),
        stored_lot(5, 10),
    )
    posting = rules.deduct(holder, 45, at=NOW, key="d")
    assert [(lot.id, taken) for lot, taken in posting.draws] == [(4, 10), (3, 10), (2, 10), (1, 10), (5, 5)]
    assert remaining(holder) == {4: 0, 3: 0, 2: 0, 1: 0, 5: 5}
    assert (posting.amount, posting.balance_after) == (-45, 5)


def test_a_lot_granted_in_the_same_unit_is_drawn_after_older_equal_lots() -> None:
    holder = with_lots(stored_lot(7, 5))
    new = rules.grant(holder, 5, at=NOW, key="g").lot
    posting = rules.deduct(holder, 7, at=NOW, key="d")
    assert [(lot.id, taken) for lot, taken in posting.draws] == [(7, 5), (None, 2)]
    assert new is not None and new.remaining == 3


def test_deduct_beyond_available_is_refused_and_changes_nothing() -> None:
    holder = with_lots(stored_lot(1, 10))
    holder.reserved = 4
    with pytest.raises(InsufficientCredits) as refused:
        rules.deduct(holder, 7, at=NOW, key="d")
    assert refused.value.details["available"] == 6
    assert (holder.balance, holder.reserved, remaining(holder)) == (10, 4, {1: 10})


def test_hold_takes_credits_out_of_available_without_drawing_lots() -> None:
    holder = with_lots(stored_lot(1, 50))
    posting = rules.hold(holder, 20, hold_id="h", at=NOW, expires_at=NOW + timedelta(seconds=60), key="r")
    assert posting.hold is not None and posting.hold.expires_at == NOW + timedelta(seconds=60)
    assert (holder.balance, holder.reserved, holder.available, remaining(holder)) == (50, 20, 30, {1: 50})
    with pytest.raises(InsufficientCredits):
        rules.hold(holder, 31, hold_id="h2", at=NOW, expires_at=NOW + timedelta(seconds=60), key="r2")


def test_hold_expiry_counts_the_ttl_from_the_earlier_of_asked_and_applied() -> None:
    def expiry(**times: datetime) -> datetime:
        return rules.hold_expiry(NOW, checked_at=NOW, ttl_seconds=60, **times)

    assert expiry() == NOW + timedelta(seconds=60)
    assert expiry(requested_at=NOW - timedelta(seconds=20)) == NOW + timedelta(seconds=40)
    assert expiry(requested_at=NOW + timedelta(hours=1)) == NOW + timedelta(seconds=60)
    with pytest.raises(ValidationFailed) as elapsed:
        expiry(requested_at=NOW - timedelta(seconds=60))
    assert elapsed.value.details["reason"] == "ttl_elapsed"
    with pytest.raises(ValidationFailed) as late:
        rules.hold_expiry(NOW, checked_at=NOW + timedelta(seconds=2), ttl_seconds=60,
                          deadline=NOW + timedelta(seconds=1))
    assert (late.value.details["reason"], late.value.details["applied"]) == ("deadline_passed", False)


def held(holder: rules.Account, amount: int, ttl_seconds: int = 60) -> rules.Hold:
    posting = rules.hold(holder, amount, hold_id="h", at=NOW, expires_at=NOW + timedelta(seconds=ttl_seconds), key="r")
    assert posting.hold is not None
    return posting.hold


def test_settle_below_the_hold_charges_the_actual_amount_and_frees_the_rest() -> None:
    holder = with_lots(stored_lot(1, 50))
    hold = held(holder, 20)
    posting = rules.settle(holder, hold, 12, policy=OveragePolicy.REJECT, at=NOW, key="c")
    assert (posting.amount, posting.held) == (-12, -20)
    assert (holder.balance, holder.reserved, hold.status, hold.committed_amount) == (38, 0, "committed", 12)
    assert hold.finalized_at == NOW


def test_settle_above_what_is_available_is_refused_unless_the_policy_allows_a_debt() -> None:
    holder = with_lots(stored_lot(1, 50))
    hold = held(holder, 20)
    with pytest.raises(InsufficientCredits):
        rules.settle(holder, hold, 51, policy=OveragePolicy.REJECT, at=NOW, key="c")
    assert (holder.balance, holder.reserved, hold.status) == (50, 20, "active")
    posting = rules.settle(holder, hold, 60, policy=OveragePolicy.ALLOW_NEGATIVE, at=NOW, key="c")
    assert [taken for _lot, taken in posting.draws] == [50]  # the lots give what they have
    assert (holder.balance, holder.reserved) == (-10, 0)


def test_a_finished_or_timed_out_hold_cannot_be_settled_or_released() -> None:
    holder = with_lots(stored_lot(1, 50))
    hold = held(holder, 10)
    with pytest.raises(ReservationNotActive) as refused:
        rules.release(holder, hold, at=NOW + timedelta(seconds=61), key="l")
    assert refused.value.details["status"] == "expired"
    rules.release(holder, hold, at=NOW, key="l")
    assert (holder.reserved, hold.status) == (0, "released")
    with pytest.raises(ReservationNotActive):
        rules.settle(holder, hold, None, policy=OveragePolicy.REJECT, at=NOW, key="c")


def test_the_stale_hold_sweep_expires_only_active_holds_past_their_ttl() -> None:
    holder = with_lots(stored_lot(1, 50))
    hold = held(holder, 10)
    assert rules.expire_hold(holder, hold, at=NOW + timedelta(seconds=59)) is None
    posting = rules.expire_hold(holder, hold, at=NOW + timedelta(seconds=60))
    assert posting is not None and (posting.kind, posting.held) == ("reservation_expired", -10)
    assert rules.expire_hold(holder, hold, at=NOW + timedelta(days=1)) is None


def test_expiry_takes_expired_lots_in_id_order_but_never_held_credits() -> None:
    holder = with_lots(stored_lot(1, 30, expires_in_days=1), stored_lot(2, 10, expires_in_days=1), stored_lot(3, 5))
    holder.reserved = 20
    postings = rules.expire(holder, holder.lots, at=NOW + timedelta(days=2))
    assert [(posting.lot.id if posting.lot else None, posting.amount) for posting in postings] == [(1, -25)]
    swept_at = NOW + timedelta(days=2)
    assert postings[0].idempotency_key == f"system:expire:1:{swept_at:%Y%m%dT%H%M%S%f}:30"
    assert (holder.balance, remaining(holder)) == (20, {1: 5, 2: 10, 3: 5})


def test_low_credit_fires_once_per_crossing_at_or_below_and_rearms_above_the_threshold() -> None:
    holder = account(balance=30, threshold=10)
    assert rules.low_credit_crossing(holder, None) is None
    holder.balance = 10  # at the threshold: low
    assert rules.low_credit_crossing(holder, None) == 10
    holder.balance = 5
    assert rules.low_credit_crossing(holder, None) is None  # still low: no second alert
    holder.balance = 10
    assert rules.low_credit_crossing(holder, None) is None and holder.low_credit_alerted
    holder.balance = 11  # above: re-armed (and recovered)
    assert rules.low_credit_crossing(holder, None) is None and not holder.low_credit_alerted
    holder.balance = 4
    assert rules.low_credit_crossing(holder, None) == 10


def test_the_service_default_threshold_applies_unless_the_account_has_its_own() -> None:
    assert rules.low_credit_crossing(account(balance=5), 10) == 10
    assert rules.low_credit_crossing(account(balance=5), None) is None
    assert rules.low_credit_crossing(account(balance=5, threshold=3), 10) is None


def test_records_match_the_models_dump() -> None:
    holder = with_lots(stored_lot(1, 50))
    posting = rules.deduct(holder, 5, at=NOW.replace(microsecond=120000), key="d", metadata={"order": 7})
    posting.id = 99
    assert entry_record(posting) == LedgerEntry.model_validate(entry_record(posting)).model_dump(mode="json")
    hold = held(holder, 3)
    assert reservation_record(hold) == Reservation.model_validate(reservation_record(hold)).model_dump(mode="json")


def test_a_batch_outcome_is_what_model_construct_makes() -> None:
    from creditworker.contract.credits import BatchOutcome
    from creditworker.engine.results import batch_outcome

    for ok, result, error in ((True, {"id": 1}, None), (False, None, {"code": "invalid_input"})):
        made, constructed = batch_outcome(ok, result, error), BatchOutcome.model_construct(ok=ok, result=result, error=error)
        assert made == constructed == BatchOutcome(ok=ok, result=result, error=error)
        assert made.model_fields_set == constructed.model_fields_set
        assert made.model_dump_json() == constructed.model_dump_json()
        assert repr(made) == repr(constructed)
        assert made.model_copy(update={"ok": not ok}).ok is not ok


# ---------------------------------------------------------------- corrections


def test_void_takes_at_most_what_is_left_and_free() -> None:
    holder = with_lots(stored_lot(1, 50), stored_lot(2, 50))
    held(holder, 70)  # 30 free on the account
    with pytest.raises(InsufficientCredits):
        rules.void(holder, holder.lots[0], None, reason="fraud", at=NOW, key="v")
    assert remaining(holder) == {1: 50, 2: 50} and holder.balance == 100
    posting = rules.void(holder, holder.lots[0], 30, reason="fraud", at=NOW, key="v")
    assert (posting.kind, posting.amount, posting.metadata) == ("void", -30, {"reason": "fraud"})
    assert remaining(holder) == {1: 20, 2: 50} and holder.available == 0


def test_refund_goes_back_in_draw_order_after_what_was_already_refunded() -> None:
    first, second = stored_lot(1, 0), stored_lot(2, 20, expires_in_days=-1)
    first.amount = second.amount = 50
    holder = with_lots(first, second)
    drawn = [(first, 50), (second, 30)]
    with pytest.raises(ValidationFailed):
        rules.refund(holder, drawn, 60, 21, entry_id=9, reason="r", at=NOW, key="k")
    given, expired = rules.refund(holder, drawn, 60, None, entry_id=9, reason="r", at=NOW, key="k")
    assert [(lot.id, taken) for lot, taken in given.draws] == [(2, 20)]  # lot 1 got its 50 back already
    assert given.refund_of == 9 and given.metadata == {
        "reason": "r", "refund_of": 9, "expired_at_once": [{"lot_id": 2, "amount": 20}]}
    assert (expired.kind, expired.amount, expired.idempotency_key) == ("expire", -20, "k")
    assert remaining(holder) == {1: 0, 2: 20} and holder.balance == 20


def test_expiry_moved_into_the_past_expires_what_no_hold_backs() -> None:
    holder = with_lots(stored_lot(1, 50, expires_in_days=5))
    held(holder, 20)
    changed, expired = rules.change_expiry(holder, holder.lots[0], NOW - timedelta(hours=1), at=NOW, key="e")
    assert (changed.kind, changed.amount, holder.lots[0].expiry_changed) == ("expiry_changed", 0, True)
    assert (expired.amount, expired.idempotency_key, remaining(holder)) == (-30, "e", {1: 20})


def test_a_lot_refunded_back_to_a_figure_it_had_gets_a_new_expiry_key() -> None:
    holder = with_lots(stored_lot(1, 30, expires_in_days=1))
    holder.reserved = 20
    first = rules.expire(holder, holder.lots, at=NOW + timedelta(days=2))
    holder.lots[0].remaining, holder.balance, holder.reserved = 30, 30, 0  # refunded back to 30
    second = rules.expire(holder, holder.lots, at=NOW + timedelta(days=3))
    assert [posting.amount for posting in first + second] == [-10, -30]
    assert first[0].idempotency_key != second[0].idempotency_key
