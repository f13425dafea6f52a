"""Registers ``npbml evolve`` with the project CLI (:mod:`npbml.cli`).

Importing this module adds the subcommand; :mod:`npbml.cli` imports it when
``"npbml.evomal.cli"`` is listed in ``npbml.cli.SUBCOMMAND_MODULES``.
"""

from __future__ import annotations

from npbml.cli import subcommand
from npbml.evomal.search import EVOLVE_HELP, add_evolve_arguments, run_evolve

subcommand("evolve", EVOLVE_HELP, add_evolve_arguments)(run_evolve)
