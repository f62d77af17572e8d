"""``python -m ewc_fused``: the command line (see :mod:`ewc_fused.cli`)."""
from .cli import main

raise SystemExit(main())
