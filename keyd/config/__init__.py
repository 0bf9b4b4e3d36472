"""config.toml, read once into frozen, typed settings; errors name the key.

- :mod:`.settings` — the frozen dataclasses the rest of keyd reads;
- :mod:`.secrets` — :class:`Secret` and where a secret may come from;
- :mod:`.table` — the strict TOML table, durations and paths every section uses
  (the backends read their own ``[backend.<kind>]`` table with it);
- :mod:`.reader` — :func:`load` and :func:`from_dict`: every table but the
  backends' own, checked and defaulted.
"""

from keyd.config import settings
from keyd.config.reader import MIN_PRODUCTION_VALIDITY, from_dict, load
from keyd.config.secrets import Secret, read_secret, require_secret
from keyd.config.settings import *  # noqa: F403  every settings type, as settings.__all__ names it
from keyd.config.table import Table, one_of, parse_duration, resolve_path
from keyd.errors import ConfigError

__all__ = [
    "MIN_PRODUCTION_VALIDITY",
    "ConfigError",
    "Secret",
    "Table",
    "from_dict",
    "load",
    "one_of",
    "parse_duration",
    "read_secret",
    "require_secret",
    "resolve_path",
]
__all__ += settings.__all__
