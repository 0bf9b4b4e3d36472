#!/bin/sh
# Install keyd from a wheel for systemd, as systemd/README.md walks through:
#   /opt/keyd                      a venv holding the wheel and its dependencies
#   /usr/local/bin/keyd            -> /opt/keyd/bin/keyd (the unit's ExecStart=)
#   /usr/local/sbin/keyd-admin     admin commands as the unit runs keyd (systemd-run)
#   /etc/systemd/system/keyd.service
#   /etc/keyd/config.toml          production template, kept if present
#   /etc/keyd/policies/            the shipped policies, kept if present
#   /etc/credstore/keyd.master-key 32 random bytes, 0600, kept if present
#   /usr/local/share/doc/keyd/     README.md, systemd.md, config.md (Documentation=)
# and, on the real root only, the `keyd` system user and a daemon-reload.
#
# Usage: systemd/install.sh [--root DIR] WHEEL
#   --root DIR  install under DIR instead of / (a staging or test root: no
#               user is created, nothing is chowned, systemd is not told)
# Run again to upgrade: the venv takes the new wheel, config and secrets stay.
set -eu

usage() { echo "usage: $0 [--root DIR] WHEEL" >&2; exit 2; }
ROOT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --root) [ $# -ge 2 ] || usage; ROOT="${2%/}"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) usage ;;
    *) break ;;
  esac
done
[ $# -eq 1 ] || usage
WHEEL="$1"
[ -f "$WHEEL" ] || { echo "install.sh: wheel $WHEEL not found (make dist builds one)" >&2; exit 1; }
case "$WHEEL" in *.whl) ;; *) echo "install.sh: $WHEEL is not a .whl" >&2; exit 1 ;; esac
SRC="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
say() { echo "install.sh: $*"; }

# 1. the program: a venv of its own, and the path the unit runs
if [ ! -x "$ROOT/opt/keyd/bin/python" ]; then
  "$PYTHON" -m venv "$ROOT/opt/keyd"
fi
"$ROOT/opt/keyd/bin/pip" install --quiet --disable-pip-version-check --upgrade "$WHEEL"
install -d -m 0755 "$ROOT/usr/local/bin"
ln -sfn ../../../opt/keyd/bin/keyd "$ROOT/usr/local/bin/keyd"  # relative: right under any root
install -D -m 0755 "$SRC/systemd/keyd-admin" "$ROOT/usr/local/sbin/keyd-admin"
say "keyd $("$ROOT/opt/keyd/bin/python" -I -c 'import importlib.metadata as m; print(m.version("keyd"))') in $ROOT/opt/keyd, $ROOT/usr/local/bin/keyd"

# 2. the unit and the documentation it names
install -D -m 0644 "$SRC/systemd/keyd.service" "$ROOT/etc/systemd/system/keyd.service"
DOC="$ROOT/usr/local/share/doc/keyd"
install -D -m 0644 "$SRC/README.md" "$DOC/README.md"
install -D -m 0644 "$SRC/systemd/README.md" "$DOC/systemd.md"
install -D -m 0644 "$SRC/docs/config.md" "$DOC/config.md"
say "unit $ROOT/etc/systemd/system/keyd.service, documentation in $DOC"

# 3. configuration and policies: an operator's edits are never overwritten
install -d -m 0750 "$ROOT/etc/keyd"
if [ -e "$ROOT/etc/keyd/config.toml" ]; then
  say "kept $ROOT/etc/keyd/config.toml"
else
  install -m 0640 "$SRC/systemd/config.toml" "$ROOT/etc/keyd/config.toml"
  say "wrote $ROOT/etc/keyd/config.toml: set client_id and organisation in it"
fi
if [ -d "$ROOT/etc/keyd/policies" ]; then
  say "kept $ROOT/etc/keyd/policies"
else
  shipped="$("$ROOT/opt/keyd/bin/python" -I -c 'from keyd.resources import default_policies_dir; print(default_policies_dir())')"
  install -d -m 0750 "$ROOT/etc/keyd/policies"
  install -m 0640 "$shipped"/*.toml "$ROOT/etc/keyd/policies/"
  say "copied the shipped policies to $ROOT/etc/keyd/policies"
fi

# 4. the master key (local backend) as a systemd credential, root-only
install -d -m 0700 "$ROOT/etc/credstore"
if [ -e "$ROOT/etc/credstore/keyd.master-key" ]; then
  say "kept $ROOT/etc/credstore/keyd.master-key"
else
  (umask 077; head -c 32 /dev/urandom | basenc --base64url | tr -d '=\n' \
     > "$ROOT/etc/credstore/keyd.master-key")
  say "made $ROOT/etc/credstore/keyd.master-key (0600): back it up off this host"
fi

# 5. the real root only: the user, group ownership, systemd
if [ -n "$ROOT" ]; then
  say "--root: skipped useradd, chgrp and systemctl daemon-reload"
else
  if ! getent passwd keyd >/dev/null; then
    useradd --system --no-create-home --home-dir /var/lib/keyd --shell /usr/sbin/nologin keyd
    say "created the system user keyd"
  fi
  chgrp -R keyd /etc/keyd
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
  fi
fi
say "next: set client_id and organisation in /etc/keyd/config.toml, then \`keyd-admin init\`"
say "      (the whole walk-through: /usr/local/share/doc/keyd/systemd.md)"
