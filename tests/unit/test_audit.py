"""What goes into the audit trail (shared/audit.py): which calls, and a body summary with no
secrets or personal data that Postgres can store."""
from __future__ import annotations

import json

from shared.audit import audited, body_summary, clean


def test_only_admin_calls_that_may_change_something_are_audited():
    for method in ("POST", "PUT", "PATCH", "DELETE", "post"):
        assert audited(method, "/admin/clock")
    assert audited("POST", "/admin/payments/o-1/risk-review") and audited("DELETE", "/admin")
    for method in ("GET", "HEAD", "OPTIONS"):
        assert not audited(method, "/admin/audit-log")
    assert not audited("POST", "/v1/users") and not audited("POST", "/administrator")


def test_secrets_and_personal_data_are_masked_at_any_depth():
    raw = json.dumps({"decision": "approve", "token": "t0k", "card_token": "tok_x", "JWT_SECRET": "s",
                      "nested": {"phone": "13812345678", "id_number": "110101199003074514", "Password": "p",
                                 "items": [{"api_key": "k", "amount": 5}]}}).encode()
    summary = body_summary(raw)
    assert summary == {"decision": "approve", "token": "***", "card_token": "***", "JWT_SECRET": "***",
                       "nested": {"phone": "***", "id_number": "***", "Password": "***",
                                  "items": [{"api_key": "***", "amount": 5}]}}
    assert "13812345678" not in json.dumps(summary)


def test_summaries_are_bounded_and_storable():
    summary = body_summary(json.dumps({"note": "x" * 1000, "list": list(range(100)),
                                       "deep": {"a": {"b": {"c": {"d": 1}}}}}).encode())
    assert len(summary["note"]) == 101 and len(summary["list"]) == 20
    assert summary["deep"] == {"a": {"b": {"c": "{1 fields}"}}}
    assert body_summary(b"") is None
    assert body_summary(b"\xff\xfe not json") == "<11 bytes, not JSON>"
    assert body_summary(b'{"x": NaN, "y": Infinity}') == {"x": "nan", "y": "inf"}
    nul = body_summary(json.dumps({"a\u0000": "b\u0000\ud800"}).encode())
    assert "\x00" not in json.dumps(nul) and json.dumps(nul, ensure_ascii=False).encode("utf-8")
    assert clean("/admin/\x00x\n", 300) == "/admin/\ufffdx\ufffd"
