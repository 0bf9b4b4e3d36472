"""The per-issuer keys of issue 9 are read strictly: each error names the key."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from keyd import config
from keyd.errors import ConfigError
from tests.fixtures.daemon import write_config

URI = "http://127.0.0.1:9/jwks"


def load(tmp_path: Path, **issuer: Any) -> config.IssuerSettings:
    path = write_config(tmp_path, {"issuers.paynet": {"jwks_uri": URI, **issuer}})
    return config.load(str(path)).issuers["paynet"]


def test_defaults_require_nothing_and_allow_ten_seconds(tmp_path: Path) -> None:
    issuer = load(tmp_path)
    assert issuer.require == () and issuer.leeway == timedelta(seconds=10)
    assert issuer.link_prefixes == () and issuer.redirect_uri_prefixes == ()


def test_paynets_profile_is_read(tmp_path: Path) -> None:
    issuer = load(tmp_path, iss="paynet", require=["iat", "jti", "iss"], leeway="30s",
                  link_prefixes=["https://dp.example.my/ofm/"],
                  redirect_uri_prefixes=["myapp://callback/"])
    assert issuer.require == ("iat", "jti", "iss") and issuer.leeway == timedelta(seconds=30)
    assert issuer.redirect_uri_prefixes == ("myapp://callback/",)


@pytest.mark.parametrize(
    "issuer, key",
    [
        ({"require": ["exp"]}, "require"),
        ({"require": ["iss"]}, "require"),  # an iss to compare with is needed
        ({"require": "iat"}, "require"),
        ({"leeway": "1h"}, "leeway"),
        ({"leeway": "soon"}, "leeway"),
        ({"link_prefixes": ["https://dp.example.my"]}, "link_prefixes"),  # no '/' after host
        ({"link_prefixes": ["http://dp.example.my/"]}, "link_prefixes"),  # not https
        ({"redirect_uri_prefixes": ["tpp.example/cb/"]}, "redirect_uri_prefixes"),
        ({"redirect_uri_prefixes": ["https://tpp.example/cb/?x=1"]}, "redirect_uri_prefixes"),
    ],
)
def test_bad_issuer_keys_are_refused_naming_the_key(
    tmp_path: Path, issuer: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, **issuer)
    assert f"[issuers.paynet] {key}" in info.value.detail
