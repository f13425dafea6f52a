"""NPBML's layers: the building blocks of its network and of its learned inner loss.

* :mod:`.film` - FiLM generators and FiLM-modulated blocks (psi) and the block registry;
* :mod:`.warp` - :class:`~.warp.WarpLayer`, the meta-learned preconditioner omega;
* :mod:`.task_loss` - :class:`~.task_loss.TaskAdaptiveLoss`, the inner loss ``M`` (phi);
* :mod:`.relation` - :class:`~.relation.RelationNetwork`, the frozen scorer behind ``L_Q``;
* :mod:`.norm` - batch-statistics BatchNorm and spatial means fast in the adapted layout;
* :mod:`.unfold` - a convolution's input unfolded once per episode.

This package imports nothing at import time (import its modules directly), so that loading a
layer does not import the learner.
"""
