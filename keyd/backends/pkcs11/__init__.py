"""The ``pkcs11`` backend: RSA keys on an HSM token (see :mod:`.backend`).

- :mod:`.backend` — :class:`Pkcs11Backend`, the Backend protocol over a token, and
  ``PLUGIN`` (its ``[backend.pkcs11]`` table, capabilities and identity);
- :mod:`.token` — loading the module once per process, the login, the session pool;
- :mod:`.oaep` — OAEP decoding for tokens without ``CKM_RSA_PKCS_OAEP``/SHA-256.
"""

from keyd.backends.pkcs11.backend import NOT_EXPORTABLE, PLUGIN, Pkcs11Backend, from_settings
from keyd.backends.pkcs11.token import load_module

__all__ = ["NOT_EXPORTABLE", "PLUGIN", "Pkcs11Backend", "from_settings", "load_module"]
