"""Container health check: exit 0 when /readyz answers 200 (standard library only)."""

import os
import sys
import urllib.request

port = os.environ.get("FOLDSERVE_PORT", "8000")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError:
    sys.exit(1)
