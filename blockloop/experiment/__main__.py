"""`python -m blockloop.experiment FILE ...`: the same as `blockloop experiment FILE ...`."""

import sys

from blockloop.experiment.command import main

sys.exit(main())
