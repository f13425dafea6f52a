"""NPBML: Neural Procedural Bias Meta-Learning and the MAML / learned-loss family."""

__version__ = "0.1.0"
