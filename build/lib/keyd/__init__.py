"""keyd: the key and certificate daemon of an Open Finance participant."""

__version__ = "0.1.0"
