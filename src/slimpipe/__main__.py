"""`python -m slimpipe ...` (what torchrun runs: `torchrun ... -m slimpipe train ...`)."""

from slimpipe.cli import main

raise SystemExit(main())
