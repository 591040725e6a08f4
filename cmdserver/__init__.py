"""cmdserver: a small, safe set of remote diagnostic commands for operators."""

__version__ = "0.1.0"
__all__ = ["__version__"]
