import pytest

from shared import settings


def test_defaults_follow_the_contract(monkeypatch):
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "GATEWAY_URL", "ESCROW_URL", "CREDIT_URL", "BILLING_URL",
                 "DANBAO_CLOCK", "GATEWAY_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DANBAO_API_TOKEN", "op-token-value")
    monkeypatch.setenv("DANBAO_JWT_SECRET", "jwt-secret-value")
    monkeypatch.setenv("DANBAO_PII_KEY", "pii-key-value")
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


def test_secrets_are_lists_for_rotation(monkeypatch):
    monkeypatch.setenv("DANBAO_API_TOKEN", "tok-new, tok-old,")
    monkeypatch.setenv("DANBAO_JWT_SECRET", "default-secret")
    monkeypatch.setenv("DANBAO_JWT_KEYS", "2026-11:secret:with:colons, 2026-10:older")
    s = settings.load("gateway")
    assert s.api_tokens == ("tok-new", "tok-old")
    assert s.jwt_secrets == ("default-secret",)
    assert s.jwt_keys == {"2026-11": "secret:with:colons", "2026-10": "older"}
    assert "tok-old" not in repr(s) and "older" not in repr(s)


def test_named_jwt_keys_alone_are_enough(monkeypatch):
    monkeypatch.setenv("DANBAO_API_TOKEN", "t")
    monkeypatch.delenv("DANBAO_JWT_SECRET", raising=False)
    monkeypatch.setenv("DANBAO_JWT_KEYS", "k1:s1")
    assert settings.load("gateway").jwt_keys == {"k1": "s1"}
    monkeypatch.delenv("DANBAO_JWT_KEYS")
    with pytest.raises(settings.SettingsError):
        settings.load("gateway")


@pytest.mark.parametrize("value", ["no-colon-secret", ":secret", "k1:", "bad kid:s", "k1:a,k1:b"])
def test_malformed_jwt_keys_are_refused_without_echoing_the_secret(monkeypatch, value):
    monkeypatch.setenv("DANBAO_API_TOKEN", "t")
    monkeypatch.setenv("DANBAO_JWT_KEYS", value)
    with pytest.raises(settings.SettingsError) as info:
        settings.load("gateway")
    assert "secret" not in str(info.value).replace("kid:secret", "") and "no-colon" not in str(info.value)


def test_services_keeping_personal_data_refuse_to_start_without_the_pii_key(monkeypatch):
    monkeypatch.setenv("DANBAO_API_TOKEN", "t")
    monkeypatch.setenv("DANBAO_JWT_SECRET", "s")
    monkeypatch.delenv("DANBAO_PII_KEY", raising=False)
    for service in ("gateway", "credit"):
        with pytest.raises(settings.SettingsError, match="DANBAO_PII_KEY"):
            settings.load(service)
    settings.load("escrow")  # holds no personal data: does not need it
    settings.load("billing")
    monkeypatch.setenv("DANBAO_PII_KEY", "k")
    settings.load("gateway")


def test_the_consumers_pause_under_load_grows_with_the_batch(monkeypatch):
    from shared.consumer import ConsumerLoop

    monkeypatch.setenv("DANBAO_API_TOKEN", "t")
    monkeypatch.setenv("DANBAO_JWT_SECRET", "s")
    monkeypatch.delenv("CONSUMER_GATHER_MS", raising=False)
    s = settings.load("escrow")
    assert (s.consumer_gather_ms, s.consumer_gather_records, s.consumer_commit_ms) == (20, 64, 100)
    monkeypatch.setenv("CONSUMER_COMMIT_MS", "0")
    assert settings.load("escrow").consumer_commit_ms == 0  # a commit after every batch (in the background)
    monkeypatch.setenv("CONSUMER_COMMIT_MS", "-5")
    with pytest.raises(settings.SettingsError, match="CONSUMER_COMMIT_MS"):
        settings.load("escrow")
    monkeypatch.delenv("CONSUMER_COMMIT_MS")
    monkeypatch.setenv("CONSUMER_GATHER_MS", "-1")
    with pytest.raises(settings.SettingsError, match="CONSUMER_GATHER_MS"):
        settings.load("escrow")

    loop = ConsumerLoop.__new__(ConsumerLoop)  # the pause rule alone, no Kafka client
    loop.gather_seconds, loop.gather_records = 0.05, 64
    assert loop.gather_pause(1) == 0.0  # light load: a record alone goes on at once
    assert loop.gather_pause(16) == pytest.approx(0.0125)
    assert loop.gather_pause(64) == loop.gather_pause(5_000) == pytest.approx(0.05)
    loop.gather_seconds = 0.0  # CONSUMER_GATHER_MS=0: never
    assert loop.gather_pause(500) == 0.0
