"""Billing wiring. So far: its schema (outbox, inbox), relay, health and API shell; statements,
installments and penalties arrive with the billing issue."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter

from shared.runtime import ServiceSpec

SPEC = ServiceSpec(name="billing", migrations=Path(__file__).parent / "migrations", routers=[APIRouter()])
