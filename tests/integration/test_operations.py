"""What every service offers operators: health, metrics, OpenAPI, and the shared test clock."""
from __future__ import annotations

from datetime import datetime

from tests.integration.conftest import SERVICES


def parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


async def test_every_service_has_health_metrics_and_openapi(services, api):
    for name in SERVICES:
        client = api(name)
        health = await client.get("/health")
        assert health.status_code == 200
        assert health.json() == {"status": "ok", "service": name, "postgres": "ok", "kafka": "ok"}
        metrics = await client.get("/metrics")
        assert metrics.status_code == 200 and "danbao_http_requests_total" in metrics.text
        spec = (await client.get("/openapi.json")).json()
        assert spec["info"]["title"] == f"Danbao {name}"
        assert "/admin/clock" in spec["paths"]
    gateway_paths = (await api("gateway").get("/openapi.json")).json()["paths"]
    assert {"/v1/users", "/v1/users/{user_id}", "/v1/payments/{order_id}"} <= set(gateway_paths)


async def test_test_clock_is_shared_and_never_moves_back(services, api):
    before = parse((await api("escrow").get("/admin/clock")).json()["now"])
    moved = await api("gateway").post("/admin/clock", json={"advance_seconds": 3600})
    assert moved.status_code == 200
    after = parse(moved.json()["now"])
    assert 3600 <= (after - before).total_seconds() < 3700
    # Another service sees the same clock.
    seen = parse((await api("billing").get("/admin/clock")).json()["now"])
    assert 0 <= (seen - after).total_seconds() < 60

    back = await api("credit").post("/admin/clock", json={"set": "2020-01-01T00:00:00Z"})
    assert back.status_code == 409 and back.json()["error"]["code"] == "CLOCK_MOVED_BACK"
    target = after.replace(microsecond=0).isoformat().replace("+00:00", "Z")
    # Setting a time a day ahead works and is seen everywhere.
    ahead = (after.replace(microsecond=0).timestamp() + 86400)
    target = datetime.fromtimestamp(ahead, after.tzinfo).isoformat().replace("+00:00", "Z")
    set_ = await api("credit").post("/admin/clock", json={"set": target})
    assert set_.status_code == 200
    assert abs((parse(set_.json()["now"]) - parse(target)).total_seconds()) < 5
    bad = await api("credit").post("/admin/clock", json={"advance_seconds": -1})
    assert bad.status_code in (400, 409)
    both = await api("credit").post("/admin/clock", json={"advance_seconds": 1, "set": target})
    assert both.status_code == 400


async def test_malformed_ids_and_clock_moves_are_400_with_an_error_body(services, api):
    paths = {"gateway": ["/v1/users/{}", "/v1/wallets/{}", "/v1/payments/{}"], "escrow": ["/v1/escrows/{}"],
             "credit": ["/v1/huabei/{}"], "billing": ["/v1/huabei/{}/statements"]}
    for service, templates in paths.items():
        for template in templates:
            for bad in ("%00", "a%00b", "x" * 65, "a%20b", "%E4%B8%AD"):
                response = await api(service).get(template.format(bad))
                assert response.status_code == 400, (service, template, bad, response.text)
                assert response.json()["error"]["code"] == "INVALID_REQUEST"
    for too_far in (1e30, 2**63, 10**12):
        response = await api("gateway").post("/admin/clock", json={"advance_seconds": too_far})
        assert response.status_code == 400, (too_far, response.text)
        assert response.json()["error"]["code"] == "INVALID_REQUEST"
