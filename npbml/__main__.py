"""``python -m npbml``: the same as the ``npbml`` console script."""

import sys

from npbml.cli import main

if __name__ == "__main__":
    sys.exit(main())
