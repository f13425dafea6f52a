"""MAML: Finn et al., "Model-Agnostic Meta-Learning", ICML 2017 (arXiv 1703.03400), Algorithm 2.

Inner rule (eq. 1):  theta_{j+1} = theta_j - alpha * grad_theta L_CE(S; theta_j),  theta_0 = theta.
Meta-objective (eq. 3 / Algorithm 2): min_theta sum_i L_CE(Q_i; theta_{i,J}), second order by
default, first order (FOMAML, section 5.2) with ``first_order=True``.
"""

from __future__ import annotations

from npbml.algorithms.base import GradientLearner

__all__ = ["MAML"]


class MAML(GradientLearner):
    """Model-Agnostic Meta-Learning (see :class:`~npbml.algorithms.base.GradientLearner`)."""
