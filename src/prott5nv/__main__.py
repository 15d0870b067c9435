"""`python -m prott5nv` runs the CLI (this is how torchrun launches it)."""

import sys

from .cli import main

sys.exit(main())
