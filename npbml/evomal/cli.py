"""Former wiring of ``npbml evolve``; the command now lives in :mod:`npbml.cli.evolve`, listed
explicitly in :data:`npbml.cli.COMMANDS`.

Kept so that ``import npbml.evomal.cli`` still works; importing it registers nothing (the library
does not import the CLI). The names below are the search's own argparse pieces, for callers that
build a parser of their own.
"""

from __future__ import annotations

from npbml.evomal.search import EVOLVE_HELP, add_evolve_arguments, run_evolve

__all__ = ["EVOLVE_HELP", "add_evolve_arguments", "run_evolve"]
