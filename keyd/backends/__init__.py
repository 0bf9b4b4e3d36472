"""Key backends: one protocol (base.py), one module per implementation."""
