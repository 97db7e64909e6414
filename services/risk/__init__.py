"""Danbao's real-time risk engine: a faust-streaming application (its own process).

`python -m services.risk` runs the worker. The rules are in `domain.py`, the faust wiring
(agents, tables, web) in `app.py`; README.md explains windows, state, restarts and settings.
"""
