import pytest

from shared import settings


def test_defaults_follow_the_contract(monkeypatch):
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "GATEWAY_URL", "ESCROW_URL", "CREDIT_URL", "BILLING_URL",
                 "DANBAO_CLOCK", "GATEWAY_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DANBAO_API_TOKEN", "op-token-value")
    monkeypatch.setenv("DANBAO_JWT_SECRET", "jwt-secret-value")
    s = settings.load("gateway")
    assert s.kafka_bootstrap_servers == "127.0.0.1:9092"
    assert s.database_url == "postgresql://danbao@127.0.0.1:5432/danbao"
    assert s.urls == {"gateway": "http://127.0.0.1:8001", "escrow": "http://127.0.0.1:8002",
                      "credit": "http://127.0.0.1:8003", "billing": "http://127.0.0.1:8004"}
    assert s.http_port == 8001 and s.clock_mode == "system"
    assert settings.load("billing").http_port == 8004
    assert "op-token-value" not in repr(s) and "jwt-secret-value" not in repr(s)  # secrets stay out of logs


def test_services_refuse_to_start_without_secrets(monkeypatch):
    monkeypatch.delenv("DANBAO_API_TOKEN", raising=False)
    monkeypatch.setenv("DANBAO_JWT_SECRET", "s")
    with pytest.raises(settings.SettingsError):
        settings.load("gateway")


def test_unknown_clock_mode_is_refused(monkeypatch):
    monkeypatch.setenv("DANBAO_API_TOKEN", "t")
    monkeypatch.setenv("DANBAO_JWT_SECRET", "s")
    monkeypatch.setenv("DANBAO_CLOCK", "sundial")
    with pytest.raises(settings.SettingsError):
        settings.load("gateway")
