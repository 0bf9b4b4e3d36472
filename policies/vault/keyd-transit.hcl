# The least privilege keyd's vault backend needs (keyd/backends/vault.py).
#
# Written for the default mount "transit" and key prefix "keyd-"; replace
# "transit/" and "keyd-" below if [backend.vault] mount or key_prefix differ.
# keyd can create, read, use and delete its own keys, and nothing else: no
# other key in the mount, no key-config change beyond the one keyd makes at
# destroy time, no backup/restore, no rotation, no export of signing or
# encryption keys (they are created non-exportable anyway).

# Create a key (POST), read its public key, set deletion_allowed=true on it at
# destroy time (keys/<name>/config) and delete it.  Vault globs may only end a
# path, so this also covers the key's other sub-paths (rotate, trim): keyd never
# calls them, but the policy language cannot carve them out beside the prefix.
path "transit/keys/keyd-*" {
  capabilities = ["create", "read", "update", "delete"]
}

# Orphan check after a crash: list the mount's key names.
path "transit/keys" {
  capabilities = ["list"]
}

# The private-key operations.
path "transit/sign/keyd-*" {
  capabilities = ["update"]
}

path "transit/decrypt/keyd-*" {
  capabilities = ["update"]
}

# Only a transport key may be exported (for a TLS terminator), and only when
# it was created exportable.
path "transit/export/encryption-key/keyd-transport-*" {
  capabilities = ["read"]
}

# Token health and renewal by the scheduler.
path "auth/token/lookup-self" {
  capabilities = ["read"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}
