"""Data folders shipped inside the package: Alembic scripts and default policies.

They live at the top of the checkout (migrations/, policies/) and setup.py
maps them to ``keyd.migrations`` and ``keyd.policies``, so importlib.resources
finds them in a wheel, a system install and an editable checkout alike.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from keyd.errors import ConfigError


def resource_dir(package: str) -> Path:
    """The folder of a data package shipped with keyd, as a real path.

    Alembic and the policy loader read folders, so a zipped install (where
    the resource is not a folder on disk) is refused with a clear message.
    """
    try:
        folder = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise ConfigError(f"{package} is missing from this keyd install; reinstall keyd") from None
    if not isinstance(folder, Path) or not folder.is_dir():
        raise ConfigError(f"{package} is not a folder on disk ({folder}); install keyd unzipped")
    return folder


def migrations_dir() -> Path:
    return resource_dir("keyd.migrations")


def default_policies_dir() -> Path:
    """The shipped ``admin`` and ``service`` policies."""
    return resource_dir("keyd.policies")
