"""Interoperability with other meta-learning libraries (optional; each module imports its
library lazily, so importing npbml never requires them)."""
