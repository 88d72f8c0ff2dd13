"""`python -m mistol`: the `mistol` command."""

import sys

from .cli import main

sys.exit(main())
