"""python -m deqrun.studies.precision: see deqrun/studies/precision/__init__.py."""

import sys

from .cli import main

sys.exit(main())
