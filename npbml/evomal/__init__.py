"""EvoMAL: evolved model-agnostic loss functions (Raymond et al., TPAMI 2023, arXiv 2209.08907).

Genetic programming over symbolic loss expressions, gradient-based tuning of their node scalars,
and the resulting loss as a torch module. See docs/methods/evomal.md.
"""

from npbml.evomal.config import EvolveConfig
from npbml.evomal.expression import EvolvedLoss, Expression, load_evolved_loss, loss_inputs
from npbml.evomal.search import (
    WORST_FITNESS,
    Evaluation,
    Evaluator,
    EvoMALSearch,
    FitnessData,
    SearchResult,
    add_evolve_arguments,
    add_evolve_parser,
    class_dataset_data,
    gaussian_mixture,
    idx_data,
    run_evolve,
    run_search,
)

__all__ = [
    "WORST_FITNESS",
    "Evaluation",
    "Evaluator",
    "EvoMALSearch",
    "EvolveConfig",
    "EvolvedLoss",
    "Expression",
    "FitnessData",
    "SearchResult",
    "add_evolve_arguments",
    "add_evolve_parser",
    "class_dataset_data",
    "gaussian_mixture",
    "idx_data",
    "load_evolved_loss",
    "loss_inputs",
    "run_evolve",
    "run_search",
]
