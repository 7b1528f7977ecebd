"""``python -m service`` is ``foldserve``."""

from service.cli import main

raise SystemExit(main())
