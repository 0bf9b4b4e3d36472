"""HTTP interfaces: public.py (the JWKS, nothing else), local.py and admin.py
(the authenticated local API), errors.py, auth.py, server.py (listeners)."""
