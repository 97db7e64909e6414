"""docs/schemas/ (linked from the README) is generated from shared/events.py and must match it."""
import json
from pathlib import Path

from shared.events import write_schemas

DOCS = Path(__file__).resolve().parents[2] / "docs" / "schemas"


def test_published_json_schemas_match_the_models(tmp_path):
    fresh = {Path(p).name: json.loads(Path(p).read_text()) for p in write_schemas(str(tmp_path))}
    published = {p.name: json.loads(p.read_text()) for p in DOCS.glob("*.json")}
    assert published == fresh, "run `.venv/bin/python -m shared.events docs/schemas` and commit the result"
    assert {"Envelope.json", "OrderPlaced.json", "PaymentSucceeded.json", "RefundRejected.json"} <= set(published)
    assert published["OrderPlaced.json"]["additionalProperties"] is False
