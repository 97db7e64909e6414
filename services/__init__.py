"""The four Danbao services, one package each: domain.py (rules), handlers.py (effects), store.py (SQL), api.py (HTTP), app.py (wiring)."""
