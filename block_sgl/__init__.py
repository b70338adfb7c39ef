"""block_sgl: predictive, cache- and load-aware request routing for SGLang clusters.

Importing this package has no side effects; see README.md for the layout.
"""

__version__ = "0.1.0"
