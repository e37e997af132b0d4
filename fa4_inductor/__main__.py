"""``python -m fa4_inductor explain ...``: see :mod:`fa4_inductor.cli`."""

import sys

from .cli import main

sys.exit(main())
