"""The ops console without Kafka or Postgres: who gets in (sessions, bearer tokens, CSRF) and the
pure figures of its overview. Its pages with data are tested in a browser
(tests/integration/test_console.py)."""
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from deploy.ops import console, overview
from shared.auth import fingerprint

TOKENS = ("current-operator-token", "retiring-operator-token")


@pytest.fixture
def client():
    return TestClient(console.create_app(TOKENS), base_url="http://127.0.0.1:8006", follow_redirects=False)


def _login(client: TestClient, token: str, next_: str = "/") -> object:
    page = client.get("/login")
    nonce = page.cookies.get(console.LOGIN_COOKIE)
    assert nonce and f'value="{nonce}"' in page.text
    return client.post("/login", data={"csrf": nonce, "token": token, "next": next_})


def test_health_needs_no_token_and_pages_send_you_to_log_in(client):
    assert client.get("/health").json()["status"] == "ok"
    r = client.get("/dead-letters")
    assert r.status_code == 303 and r.headers["location"] == "/login?next=%2Fdead-letters"
    assert client.post("/dead-letters/orders.events.dlq:0:1/replay").status_code == 401


def test_log_in_sets_a_signed_http_only_strict_cookie_for_any_valid_token(client):
    r = _login(client, TOKENS[1], "/dead-letters")
    assert r.status_code == 303 and r.headers["location"] == "/dead-letters"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{console.SESSION_COOKIE}=") and "HttpOnly" in cookie and "SameSite=strict" in cookie
    session = client.cookies.get(console.SESSION_COOKIE)
    assert TOKENS[1] not in session and session.startswith(fingerprint(TOKENS[1]))
    assert console.check_session(session, TOKENS) == TOKENS[1]


def test_a_wrong_token_or_a_missing_form_nonce_is_refused(client):
    r = _login(client, "not-a-token")
    assert r.status_code == 401 and "not an operator token" in r.text
    assert console.SESSION_COOKIE not in client.cookies
    r = client.post("/login", data={"csrf": "guessed", "token": TOKENS[0]})
    assert r.status_code == 403 and console.SESSION_COOKIE not in client.cookies


def test_a_session_is_refused_when_forged_expired_or_its_token_retired():
    now = 1_800_000_000
    session = console.make_session(TOKENS[0], now)
    assert console.check_session(session, TOKENS, now + 60) == TOKENS[0]
    assert console.check_session(session, TOKENS, now + console.SESSION_SECONDS + 1) is None
    assert console.check_session(session, TOKENS[1:], now) is None  # the token was retired
    fp, issued, sig = session.split(".")
    assert console.check_session(f"{fp}.{int(issued) + 3600}.{sig}", TOKENS, now + 60) is None
    assert console.check_session(f"{fingerprint(TOKENS[1])}.{issued}.{sig}", TOKENS, now + 60) is None
    assert console.check_session("garbage", TOKENS, now) is None
    assert console.check_session(None, TOKENS, now) is None


def test_posts_with_a_session_need_its_csrf_token(client):
    _login(client, TOKENS[0])
    assert client.post("/dead-letters/orders.events.dlq:0:1/replay", data={"csrf": "wrong"}).status_code == 403
    assert client.post("/logout", data={}).status_code == 403
    session = client.cookies.get(console.SESSION_COOKIE)
    r = client.post("/logout", data={"csrf": console.csrf_for(TOKENS[0], session)})
    assert r.status_code == 303 and r.headers["location"] == "/login"


def test_a_bearer_header_is_enough_and_names_the_operator_by_fingerprint():
    from starlette.requests import Request

    def request(headers):
        return Request({"type": "http", "headers": [(k.encode(), v.encode()) for k, v in headers.items()]})
    caller = console.caller_of(request({"authorization": f"Bearer {TOKENS[1]}"}), TOKENS)
    assert caller is not None and caller.operator == f"console:{fingerprint(TOKENS[1])}" and not caller.by_cookie
    assert console.caller_of(request({"authorization": "Bearer nope"}), TOKENS) is None
    assert console.caller_of(request({}), TOKENS) is None


def test_next_stays_on_the_console():
    assert console._safe_next("/orders/o-1") == "/orders/o-1"
    for bad in ("https://evil.example/", "//evil.example/", "/\\evil", "", None):
        assert console._safe_next(bad) == "/"


def test_no_token_no_console(monkeypatch):
    monkeypatch.delenv("DANBAO_API_TOKEN", raising=False)
    with pytest.raises(SystemExit):
        console.create_app()
    monkeypatch.setenv("DANBAO_API_TOKEN", " a , b ,")
    assert console.operator_tokens() == ("a", "b")


def test_money_buckets_and_chart():
    assert overview.bucket_for(timedelta(hours=47)) == "hour"
    assert overview.bucket_for(timedelta(days=3)) == "day"
    rows = [{"bucket": "2026-11-28", "held": 1000, "released": 500, "refunded": 0, "fee revenue": 5},
            {"bucket": "2026-11-29", "held": 0, "released": 250, "refunded": 100, "fee revenue": 2}]
    series = list(overview.MONEY_CODES.values())
    chart = overview.bar_chart(rows, series)
    assert len(chart["bars"]) == 8 and chart["top"] == 1000
    tallest = max(chart["bars"], key=lambda b: b["h"])
    assert tallest["title"] == "2026-11-28 held: 1,000 fen" and tallest["y"] + tallest["h"] == chart["height"] - 20
    half = next(b for b in chart["bars"] if b["title"].startswith("2026-11-28 released"))
    assert half["h"] * 2 == tallest["h"]
    assert [label["text"] for label in chart["labels"]] == ["11-28", "11-29"]
    assert overview.bar_chart([], series)["bars"] == []


def test_lag_is_summed_per_group():
    rows = [{"group": "g", "state": "Stable", "topic": "a", "partition": 0, "lag": 2},
            {"group": "g", "state": "Stable", "topic": "b", "partition": 1, "lag": 3},
            {"group": "f", "state": "Empty", "topic": "a", "partition": 0, "lag": 0}]
    assert overview.lag_by_group(rows) == [
        {"group": "f", "state": "Empty", "topics": "a", "partitions": 1, "lag": 0},
        {"group": "g", "state": "Stable", "topics": "a, b", "partitions": 2, "lag": 5}]


def test_a_page_whose_data_cannot_be_read_says_so(monkeypatch):
    async def broken(order_id):
        raise OSError("connection refused")
    monkeypatch.setattr(console.story, "order_story", broken)
    client = TestClient(console.create_app(TOKENS), raise_server_exceptions=False)
    r = client.get("/orders/o-1", headers={"Authorization": f"Bearer {TOKENS[0]}"})
    assert r.status_code == 503 and "OSError: connection refused" in r.text
    r = client.get("/orders/o-1")  # not logged in: sent to log in, nothing read
    assert r.url.path == "/login"
