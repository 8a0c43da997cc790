"""`python -m blockloop ...` is the `blockloop` command."""

import sys

from blockloop.cli import main

sys.exit(main())
