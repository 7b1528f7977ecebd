"""Load benchmark of foldserve against its baselines: the entry point (the code is in load/).

Run it through bench/run, which sets up .venv-bench and wrk; ``--help`` lists the options.
"""

from __future__ import annotations

import sys

from load.main import main

if __name__ == "__main__":
    sys.exit(main())
