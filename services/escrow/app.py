"""Escrow wiring. So far: its schema (outbox, inbox), relay, health and API shell; holds,
releases and refunds arrive with the escrow issue."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter

from shared.runtime import ServiceSpec

SPEC = ServiceSpec(name="escrow", migrations=Path(__file__).parent / "migrations", routers=[APIRouter()])
