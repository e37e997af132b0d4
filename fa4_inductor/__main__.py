"""``python -m fa4_inductor explain ...``: see :mod:`fa4_inductor.inspection.cli`."""

import sys

from fa4_inductor.inspection.cli import main

sys.exit(main())
