"""The fault suite's pure logic (deploy/chaos.py): which request an outcome answers, the outcome
check, pause and recovery, and what wallets and credit lines must hold."""
import pytest

from deploy import chaos


def event(type_: str, event_id: str = "e1", **data) -> dict:
    return {"event_id": event_id, "type": type_, "data": data}


def test_outcome_key_names_the_request_an_outcome_answers():
    assert chaos.outcome_key(event("PaymentSucceeded", order_id="o1")) == ("o1", "payment")
    assert chaos.outcome_key(event("PaymentFailed", order_id="o1")) == ("o1", "payment")
    assert chaos.outcome_key(event("FundsReleased", order_id="o1")) == ("o1", "release")
    assert chaos.outcome_key(event("RefundCompleted", order_id="o1", refund_id=None)) == ("o1", "cancel")
    assert chaos.outcome_key(event("RefundRejected", order_id="o1", refund_id="r1")) == ("o1", "refund:r1")
    assert chaos.outcome_key(event("SomethingElse", order_id="o1")) is None
    assert chaos.outcome_key({"type": "PaymentFailed", "data": None}) is None


def test_check_outcomes_finds_missing_doubled_and_unexpected():
    expected = {("o1", "payment"), ("o1", "release"), ("o2", "payment")}
    seen = {("o1", "payment"): {"a": {}}, ("o1", "release"): {"b": {}, "c": {}}, ("o3", "payment"): {"d": {}}}
    check = chaos.check_outcomes(expected, seen)
    assert check.missing == [("o2", "payment")]
    assert check.doubled == [("o1", "release")]
    assert check.unexpected == [("o3", "payment")]
    assert not check.ok
    assert chaos.check_outcomes({("o1", "payment")}, {("o1", "payment"): {"a": {}}}).ok


def test_pause_is_the_longest_gap_until_the_first_outcome_after_the_fault():
    arrivals = [1.0, 2.0, 2.5, 9.0, 9.5, 20.0]
    # fault from 3 to 8: the gap 2.5 -> 9.0 is the pause, 9.0 the first outcome after the end
    assert chaos.pause_and_recovery(arrivals, 3.0, 8.0) == (6.5, 1.0)
    # outcomes kept flowing during the fault: the pause is a normal gap
    assert chaos.pause_and_recovery([1.0, 1.5, 2.0, 2.5, 3.0], 1.2, 2.2) == (0.5, pytest.approx(0.3))
    # nothing before the start: the gap counts from the start
    assert chaos.pause_and_recovery([5.0, 6.0], 2.0, 4.0) == (3.0, 1.0)
    # a later, longer gap (after the first outcome past the end) is not this fault's
    assert chaos.pause_and_recovery([1.0, 5.0, 30.0], 2.0, 4.0) == (4.0, 1.0)


def test_no_outcome_after_the_fault_means_no_recovery():
    assert chaos.pause_and_recovery([1.0, 2.0], 3.0, 5.0) == (None, None)
    assert chaos.pause_and_recovery([], 3.0, 5.0) == (None, None)


def test_first_outcomes_counts_a_doubled_request_once():
    seen = {("o1", "payment"): {"a": {"n": 1}, "b": {"n": 2}}, ("o2", "payment"): {"c": {"n": 3}}}
    assert chaos.first_outcomes(seen) == [{"n": 1}, {"n": 3}]


def test_expected_wallets_follow_the_outcomes():
    outcomes = [
        event("PaymentSucceeded", order_id="o1", buyer_id="b", amount=300, payment_method="balance"),
        event("PaymentSucceeded", order_id="o2", buyer_id="c", amount=500, payment_method="bank_card"),
        event("RefundCompleted", order_id="o1", refund_id=None, amount=100, payment_method="balance"),
        event("RefundCompleted", order_id="o2", refund_id="r1", amount=200, payment_method="bank_card"),
        event("FundsReleased", order_id="o2", seller_id="s", gross_amount=300, fee_amount=2, net_amount=298),
        event("PaymentFailed", order_id="o3", reason_code="INSUFFICIENT_BALANCE", message="no"),
    ]
    wallets = chaos.expected_wallets({"b": 1_000}, {"o1": "b", "o2": "c", "o3": "b"}, outcomes, {"h": 7})
    assert wallets == {"b": 800, "s": 298, "h": 7}


def test_expected_credit_used_is_payments_minus_refunds_minus_principal_repaid():
    outcomes = [
        event("PaymentSucceeded", order_id="o1", buyer_id="h", amount=900, payment_method="huabei"),
        event("PaymentSucceeded", order_id="o2", buyer_id="h", amount=400, payment_method="huabei"),
        event("PaymentSucceeded", order_id="o3", buyer_id="b", amount=400, payment_method="balance"),
        event("RefundCompleted", order_id="o2", refund_id="r1", amount=100, payment_method="huabei"),
    ]
    assert chaos.expected_credit_used({"o1": "h", "o2": "h", "o3": "b"}, outcomes, {"h": 450}) == {"h": 750}


def test_credit_line_problems():
    fine = {"used": 500, "reserved": 0, "credit_limit": 1_000}
    assert chaos.credit_line_problems("h", fine, 500) == []
    over = chaos.credit_line_problems("h", {"used": 900, "reserved": 200, "credit_limit": 1_000}, 900)
    assert len(over) == 2 and "out of bounds" in over[0] and "reserved" in over[1]
    assert "outcomes say 400" in chaos.credit_line_problems("h", fine, 400)[0]


def test_parse_faults():
    assert chaos.parse_faults("kill-gateway, stop-kafka") == ["kill-gateway", "stop-kafka"]
    with pytest.raises(ValueError, match="kill-nothing"):
        chaos.parse_faults("kill-nothing")
    with pytest.raises(ValueError):
        chaos.parse_faults(" , ")
    assert set(chaos.SHORT_FAULTS) <= set(chaos.DEFAULT_FAULTS) <= set(chaos.ALL_FAULTS)


def test_parse_args_short_and_overrides():
    args = chaos.parse_args(["--short", "--hang", "5"])
    assert args.faults == chaos.SHORT_FAULTS and args.timing.hang == 5 and args.timing.rate == chaos.SHORT.rate
    args = chaos.parse_args(["--faults", "twins"])
    assert args.faults == ["twins"] and args.timing == chaos.FULL


def test_render_table():
    results = [chaos.FaultResult("kill-kafka", 10.0, 17.0, "SIGKILL pid 1", pause=21.5, recovery=14.25),
               chaos.FaultResult("twins", 40.0, 80.0, "two of each", error="boom")]
    lines = chaos.render_table(results).splitlines()
    assert lines[0].split()[:4] == ["fault", "lasted", "pause", "recovery"]
    assert "21.5 s" in lines[2] and "14.2 s" in lines[2] and "7.0 s" in lines[2]
    assert "never" in lines[3] and "ERROR: boom" in lines[3]
    assert results[0].ok and not results[1].ok


def audit_report(problems=(), **changes) -> "chaos.Report":
    figures = {"bank channel: money in": 1_000, "bank channel: money out": 0, "huabei owed by buyers": 0,
               "huabei fees and penalties owed": 0, "wallet balances": 600, "escrow holds": 400,
               "repayments not yet allocated": 0, "merchant fee revenue": 0, "withdrawal fee revenue": 0,
               "installment fee revenue": 0, "penalty revenue": 0, "handed to escrow (gateway ledger)": 400,
               "received from gateway (escrow ledger)": 400, "lent through the gateway (credit ledger)": 0,
               "taken from the lender (gateway ledger)": 0, "fees paid to billing (gateway ledger)": 0,
               "fees received (billing ledger)": 0}
    return chaos.Report(figures | changes, list(problems))


def test_audit_gaps_are_zero_when_the_books_agree():
    assert set(chaos.audit_gaps(audit_report().figures).values()) == {0}
    gaps = chaos.audit_gaps(audit_report(**{"received from gateway (escrow ledger)": 450, "escrow holds": 450}).figures)
    assert gaps["gateway to escrow"] == -50 and gaps["conservation"] == -50


def test_audit_problems_after_a_clean_start_are_the_audits():
    assert chaos.audit_problems(audit_report(), audit_report()) == []
    assert chaos.audit_problems(audit_report(), audit_report(["boom"])) == ["boom"]
    assert chaos.audit_problems(None, audit_report(["boom"])) == ["boom"]


def test_audit_problems_after_a_failing_start_are_what_the_run_changed():
    before = audit_report(["gateway ledger: old", "conservation: ..."], **{"escrow holds": 450})
    # more money moved, the same discrepancy: nothing new
    same = audit_report(["gateway ledger: old", "conservation: ..."], **{"escrow holds": 550, "wallet balances": 500})
    assert chaos.audit_problems(before, same) == []
    worse = audit_report(["gateway ledger: old", "gateway ledger: new", "conservation: ..."], **{"escrow holds": 460})
    found = chaos.audit_problems(before, worse)
    assert found[0] == "gateway ledger: new" and "conservation" in found[1] and "-50 fen before" in found[1]
