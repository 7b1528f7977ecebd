"""foldserve: serve BatchNorm networks whose statistics are frozen and folded."""

__version__ = "0.1.0"
