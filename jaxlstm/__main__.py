"""Entry point for ``python -m jaxlstm``."""

import sys

from jaxlstm.cli import main

sys.exit(main())
