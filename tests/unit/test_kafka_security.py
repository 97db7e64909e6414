"""Kafka connection security settings (shared/kafka.py Security): what every aiokafka client and
the faust risk engine get, and the start-up errors for bad values."""
from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pytest

from shared.kafka import Security, client_options
from shared.settings import SettingsError

VARS = ("KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_MECHANISM", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD",
        "KAFKA_SSL_CAFILE")


@pytest.fixture
def kafka_env(monkeypatch):
    for name in VARS:
        monkeypatch.delenv(name, raising=False)

    def set_(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)
    return set_


@pytest.fixture(scope="module")
def cafile(tmp_path_factory) -> str:
    """A self-signed certificate as a PEM CA bundle (openssl, as the integration test uses)."""
    folder = tmp_path_factory.mktemp("ca")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(folder / "key.pem"), "-out", str(folder / "ca.pem"), "-days", "1",
                    "-subj", "/CN=localhost"], check=True, capture_output=True)
    return str(folder / "ca.pem")


def test_plaintext_by_default(kafka_env):
    sec = Security.from_env()
    assert sec == Security() and sec.protocol == "PLAINTEXT"
    assert client_options() == {"security_protocol": "PLAINTEXT"}
    assert sec.faust_credentials() is None


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "scram-sha-512"])
def test_sasl_plaintext(kafka_env, mechanism):
    kafka_env(KAFKA_SECURITY_PROTOCOL="sasl_plaintext", KAFKA_SASL_MECHANISM=mechanism,
              KAFKA_SASL_USERNAME="danbao", KAFKA_SASL_PASSWORD=" pass word ")
    sec = Security.from_env()
    assert client_options() == {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": mechanism.upper(),
                                "sasl_plain_username": "danbao", "sasl_plain_password": " pass word "}
    assert "pass word" not in repr(sec) and "pass word" not in sec.describe()  # never logged
    creds = sec.faust_credentials()
    assert (creds.protocol.value, creds.mechanism.value, creds.username, creds.password) == (
        "SASL_PLAINTEXT", mechanism.upper(), "danbao", " pass word ")


def test_sasl_ssl_with_a_ca_file(kafka_env, cafile):
    kafka_env(KAFKA_SECURITY_PROTOCOL="SASL_SSL", KAFKA_SASL_MECHANISM="SCRAM-SHA-512",
              KAFKA_SASL_USERNAME="danbao", KAFKA_SASL_PASSWORD="pw", KAFKA_SSL_CAFILE=cafile)
    sec = Security.from_env()
    options = sec.client_options()
    assert options["security_protocol"] == "SASL_SSL" and options["sasl_mechanism"] == "SCRAM-SHA-512"
    context = options["ssl_context"]
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert len(context.get_ca_certs()) == 1  # the CA file's certificate, not the system's
    creds = sec.faust_credentials()
    assert creds.protocol.value == "SASL_SSL" and creds.ssl_context is context


def test_ssl_without_a_ca_file_uses_the_system_cas(kafka_env):
    kafka_env(KAFKA_SECURITY_PROTOCOL="SSL")
    options = client_options()
    assert options["security_protocol"] == "SSL" and options["ssl_context"].verify_mode == ssl.CERT_REQUIRED
    assert type(Security.from_env().faust_credentials()).__name__ == "SSLCredentials"


@pytest.mark.parametrize("values, message", [
    ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "KAFKA_SECURITY_PROTOCOL must be one of"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "hunter2"},
     "KAFKA_SASL_MECHANISM must be set"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "GSSAPI", "KAFKA_SASL_USERNAME": "u",
      "KAFKA_SASL_PASSWORD": "hunter2"}, "KAFKA_SASL_MECHANISM must be one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_MECHANISM": "PLAIN", "KAFKA_SASL_USERNAME": "u"},
     "KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD must be set"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_MECHANISM": "PLAIN", "KAFKA_SASL_PASSWORD": "hunter2"},
     "KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD must be set"),
    ({"KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "hunter2"},  # credentials without a SASL protocol
     "KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD given but KAFKA_SECURITY_PROTOCOL is PLAINTEXT"),
    ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": "/nonexistent/ca.pem"}, "is not a file"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_MECHANISM": "PLAIN", "KAFKA_SASL_USERNAME": "u",
      "KAFKA_SASL_PASSWORD": "hunter2", "KAFKA_SSL_CAFILE": "/etc/hostname"}, "KAFKA_SSL_CAFILE given but"),
])
def test_bad_values_are_refused_with_the_variable_named(kafka_env, values, message):
    kafka_env(**values)
    with pytest.raises(SettingsError, match=message) as caught:
        Security.from_env()
    assert "hunter2" not in str(caught.value)  # never the password


def test_a_ca_file_that_is_not_pem_is_refused(kafka_env, tmp_path):
    junk = tmp_path / "ca.pem"
    junk.write_text("not a certificate\n")
    kafka_env(KAFKA_SECURITY_PROTOCOL="SSL", KAFKA_SSL_CAFILE=str(junk))
    with pytest.raises(SettingsError, match="not a usable PEM CA bundle"):
        Security.from_env()


def test_services_refuse_to_start_with_bad_kafka_settings(kafka_env):
    """`python -m services.<name>` and the risk engine end at once with the message, exit 1."""
    import os
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_MECHANISM": "SCRAM-SHA-1",
           "KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "p",
           "DANBAO_API_TOKEN": "t", "DANBAO_JWT_SECRET": "s"}
    for module in ("services.escrow", "services.risk"):
        done = subprocess.run([sys.executable, "-m", module], cwd=root, env=env, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 1, done.stderr
        assert "KAFKA_SASL_MECHANISM must be one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512" in done.stderr
        assert "Traceback" not in done.stderr
