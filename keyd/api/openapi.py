"""The OpenAPI description of the local API, served at /openapi.json.

Written by hand next to the handlers in local.py and admin.py, and kept true
by a schemathesis run against the live daemon (tests/daemon/test_openapi.py).
"""

from __future__ import annotations

from typing import Any

from keyd import __version__


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


_ERRORS = {
    str(code): {"description": text, **_json(_ref("Error"))}
    for code, text in (
        (400, "malformed request"),
        (401, "missing or invalid bearer token"),
        (403, "the caller's policy does not allow this"),
        (404, "unknown key, issuer or route"),
        (409, "the key's state does not allow this"),
        (405, "wrong method for this path; see Allow"),
        (413, "request body too large"),
        (415, "the request body is not Content-Type: application/json"),
        (422, "the token was refused"),
        (429, "rate limited; see Retry-After"),
        (503, "backend, store or issuer unavailable; see Retry-After"),
    )
}

_B64U = {"type": "string", "pattern": "^[A-Za-z0-9_-]*$"}
_OBJECT: dict[str, Any] = {"type": "object"}


def _call(summary: str, request: dict[str, Any] | None, answer: str, *,
          body_required: bool = True) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "security": [{"bearer": []}],
        "responses": {"200": {"description": "done", **_json(_ref(answer))}, **_ERRORS},
    }
    if request is not None:
        operation["requestBody"] = {"required": body_required, **_json(request)}
    return operation


def _object(required: list[str], properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A request body: unknown members are refused (400 naming them)."""
    schema: dict[str, Any] = {"type": "object", "properties": properties,
                              "additionalProperties": False, **extra}
    if required:
        schema["required"] = required
    return schema


_DESCRIPTION = """\
Requests are strict.  A body must be `Content-Type: application/json` (else
415) and is read by one strict JSON reader: duplicate member names, NaN,
Infinity, numbers that overflow (`1e999`), lone surrogates and nesting deeper
than 64 levels are refused (400; 413 when too deep or too large), and so are
members a call does not take (400, naming them).  Every `*_b64` member is
base64url without padding, in canonical form.  The caller is authenticated
(401 with `WWW-Authenticate: Bearer`) and its policy checked (403) before the
body is read; rotate and revoke take an empty body.  A wrong method is 405
with `Allow`.

Policy scope binds every door that signs: `iss` and `sub` (JWT claims, a
JSON-object JWS payload, extra protected headers, a message signature's
`iss`) must be client_ids of the caller's policy and every `aud` one of its
audiences (403); a payload shaped like a client assertion (`iss` = `sub`,
`aud`, `exp`) needs the `client_assertion` operation.

Verified and decrypted content is answered as `payload_b64`/`plaintext_b64`
always, and as `payload` only when it is strict JSON by the same reader;
otherwise `payload_error` says why.  On every verify door (verify/jws,
unwrap, universal link) a JSON-object payload's `exp`, `nbf` and `iat` must
be integer NumericDates that hold within the issuer's `leeway` (422), its
`iss` must be the issuer's configured `iss`, and the header must carry the
members the issuer's profile requires.
"""


SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error", "detail"],
        "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
    },
    "SignJwsRequest": _object([], {
        "payload": {},
        "payload_b64": _B64U,
        "header": _OBJECT,
        "detached": {"type": "boolean"},
        "claims_in_header": {"type": "boolean"},
    }, oneOf=[{"required": ["payload"]}, {"required": ["payload_b64"]}]),
    "SignJwsAnswer": {
        "type": "object", "required": ["jws", "kid"],
        "properties": {"jws": {"type": "string"}, "kid": {"type": "string"}},
    },
    "SignJwtRequest": _object(["claims"], {"claims": _OBJECT, "ttl": {"type": "integer"}}),
    "SignJwtAnswer": {
        "type": "object", "required": ["jwt", "kid"],
        "properties": {"jwt": {"type": "string"}, "kid": {"type": "string"}},
    },
    "ClientAssertionRequest": _object(
        ["audience"], {"audience": {"type": "string"}, "client_id": {"type": "string"}}),
    "ClientAssertionAnswer": {
        "type": "object", "required": ["client_assertion", "client_assertion_type", "kid"],
        "properties": {
            "client_assertion": {"type": "string"},
            "client_assertion_type": {
                "type": "string",
                "enum": ["urn:ietf:params:oauth:client-assertion-type:jwt-bearer"],
            },
            "kid": {"type": "string"},
        },
    },
    "DecryptRequest": _object(["jwe"], {"jwe": {"type": "string"}}),
    "DecryptAnswer": {
        "type": "object", "required": ["plaintext_b64", "kid", "header"],
        "properties": {"plaintext_b64": _B64U, "kid": {"type": "string"}, "header": _OBJECT,
                       "payload": {}, "payload_error": {"type": "string"}},
    },
    "VerifyRequest": _object(["jws", "issuer"], {
        "jws": {"type": "string"}, "issuer": {"type": "string"}, "payload_b64": _B64U}),
    "VerifyAnswer": {
        "type": "object", "required": ["valid", "header", "kid", "payload_b64"],
        "properties": {"valid": {"type": "boolean", "enum": [True]}, "header": _OBJECT,
                       "kid": {"type": "string"}, "payload_b64": _B64U, "payload": {},
                       "payload_error": {"type": "string"}},
    },
    "UnwrapRequest": _object(["jws", "issuer"], {
        "jws": {"type": "string"}, "issuer": {"type": "string"}}),
    "UnwrapAnswer": {
        "type": "object", "required": ["kid", "signer_kid", "plaintext_b64"],
        "properties": {"kid": {"type": "string"}, "signer_kid": {"type": "string"},
                       "plaintext_b64": _B64U, "payload": {},
                       "payload_error": {"type": "string"}},
    },
    "UniversalLinkRequest": _object(["url"], {
        "url": {"type": "string"}, "issuer": {"type": "string"}}),
    "UniversalLinkAnswer": {
        "type": "object", "required": ["valid", "consent_id", "signer_kid"],
        "properties": {"valid": {"type": "boolean"}, "consent_id": {"type": "string"},
                       "signer_kid": {"type": "string"}},
    },
    "Key": {
        "type": "object", "required": ["id", "kid", "purpose", "state", "alg", "not_after"],
        "properties": {
            "id": {"type": "string"}, "kid": {"type": "string"},
            "provisional": {"type": "boolean"},
            "purpose": {"type": "string", "enum": ["transport", "signing", "encryption"]},
            "state": {"type": "string", "enum": ["awaiting_certificate", "pending", "active",
                                                 "retired", "destroyed", "revoked"]},
            "alg": {"type": ["string", "null"]},
            "not_after": {"type": ["string", "null"]},
            "activates_at": {"type": ["string", "null"], "format": "date-time",
                             "description": "a pending key: when it starts signing"},
        },
    },
    "KeyList": {
        "type": "object", "required": ["keys"],
        "properties": {"keys": {"type": "array", "items": _ref("Key")}},
    },
    "Csr": {"type": "object", "required": ["csr"], "properties": {"csr": {"type": "string"}}},
    "CertificateRequest": _object(["certificate"], {
        "certificate": {"type": "string"}, "kid": {"type": "string"}}),
    "CertificateAnswer": {
        "type": "object", "required": ["key", "warnings"],
        "properties": {"key": _ref("Key"),
                       "warnings": {"type": "array", "items": {"type": "string"}}},
    },
}


def _path_kid(operation: dict[str, Any]) -> dict[str, Any]:
    operation["parameters"] = [
        {"name": "kid", "in": "path", "required": True, "schema": {"type": "string"}}
    ]
    return operation


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "keyd local API", "version": __version__,
                 "description": _DESCRIPTION},
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/v1/sign/jws": {"post": _call("Sign a JWS (attached or detached)",
                                           _ref("SignJwsRequest"), "SignJwsAnswer")},
            "/v1/sign/jwt": {"post": _call("Sign a JWT", _ref("SignJwtRequest"),
                                           "SignJwtAnswer")},
            "/v1/client-assertion": {"post": _call(
                "A private_key_jwt client assertion", _ref("ClientAssertionRequest"),
                "ClientAssertionAnswer")},
            "/v1/decrypt/jwe": {"post": _call("Decrypt a JWE addressed to us",
                                              _ref("DecryptRequest"), "DecryptAnswer")},
            "/v1/verify/jws": {"post": _call("Verify an issuer's JWS", _ref("VerifyRequest"),
                                             "VerifyAnswer")},
            "/v1/unwrap": {"post": _call("Verify a signed-then-encrypted response, decrypt it",
                                         _ref("UnwrapRequest"), "UnwrapAnswer")},
            "/v1/verify/universal-link": {"post": _call(
                "Verify a DP universal link", _ref("UniversalLinkRequest"),
                "UniversalLinkAnswer")},
            "/v1/keys": {"get": _call("Every key version (admin)", None, "KeyList")},
            "/v1/keys/{kid}/csr": {"get": _path_kid(_call("A key's CSR (admin)", None, "Csr"))},
            "/v1/keys/{kid}/certificate": {"put": _path_kid(_call(
                "Attach a CA-issued chain (admin)", _ref("CertificateRequest"),
                "CertificateAnswer"))},
        },
    }
