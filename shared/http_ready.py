"""`python -m shared.http_ready URL`: exit 0 when URL answers 200 (used by ./danbao)."""
import sys
import urllib.request

try:
    with urllib.request.urlopen(sys.argv[1], timeout=3) as response:
        sys.exit(0 if response.status == 200 else 1)
except Exception:
    sys.exit(1)
