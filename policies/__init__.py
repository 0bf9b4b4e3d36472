"""The default policies, shipped as ``keyd.policies`` (see setup.py).

One TOML file a policy; ``[keyd] policies_dir`` points keyd at a folder of its own.
"""
