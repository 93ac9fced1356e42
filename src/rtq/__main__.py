"""``python -m rtq`` is the ``rtq`` command."""

from .cli import main

raise SystemExit(main())
