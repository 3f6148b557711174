"""``python -m rnnkit``: the ``rnnkit`` command, as torchrun's ``-m rnnkit`` starts it."""

import sys

from rnnkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
