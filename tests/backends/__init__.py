"""Key backends and the store against the real services: OpenBao, SoftHSM2, PostgreSQL."""
