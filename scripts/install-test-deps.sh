#!/usr/bin/env bash
# Install the system packages the integration tests need (real Dovecot, Postfix and mail clients,
# and Chromium for the admin page's browser test, driven by PyPI's playwright from the test extra;
# `playwright install`, which downloads its own browser builds, is not used; and nginx, the HTTPS
# reverse proxy in front of the admin page in tests/integration/test_admin.py; systemd for
# `systemd-analyze verify` of contrib/systemd/mail-gateway.service, which runs without systemd as PID 1).
#
# Idempotent and non-interactive: run as root on Debian 12. Repeated runs skip apt entirely when every
# package is already present, so CI can call it unconditionally. The tests start their OWN private
# Dovecot/Postfix instances on 127.0.0.1 high ports (tests/integration/upstream.py); the system-wide
# daemons are never needed, so apt is kept from starting them and any that run are stopped.
set -euo pipefail

PACKAGES=(
    dovecot-core dovecot-imapd dovecot-pop3d dovecot-lmtpd postfix
    curl swaks fetchmail mutt isync openssl
    libnet-ssleay-perl libio-socket-ssl-perl libauthen-sasl-perl tmux
    chromium
    nginx-light
    haproxy
    systemd
    postgresql
)

say() { printf 'install-test-deps: %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    say "must run as root (apt-get install and a root-started Postfix master)" >&2
    exit 1
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    status="$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)"
    case "$status" in
        ii*) ;;
        *) missing+=("$pkg") ;;
    esac
done

if [ "${#missing[@]}" -eq 0 ]; then
    say "all ${#PACKAGES[@]} packages already installed, skipping apt"
else
    say "missing packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive

    # Keep apt from starting system daemons on the default ports: invoke-rc.d consults policy-rc.d
    # and exit 101 means "action forbidden". Restore whatever was there before, even on failure.
    policy=/usr/sbin/policy-rc.d
    backup=""
    if [ -e "$policy" ] || [ -L "$policy" ]; then
        backup="$(mktemp /usr/sbin/policy-rc.d.bak.XXXXXX)"
        say "saving existing $policy to $backup"
        mv -f "$policy" "$backup"
    fi
    restore_policy() {
        rm -f "$policy"
        if [ -n "$backup" ]; then
            mv -f "$backup" "$policy"
            say "restored previous $policy"
        else
            say "removed temporary $policy"
        fi
    }
    trap restore_policy EXIT
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    say "installed temporary $policy (exit 101: no daemon starts during install)"

    say "preseeding postfix debconf (No configuration)"
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections

    say "apt-get update"
    apt-get update -q >/dev/null

    say "apt-get install ${missing[*]}"
    apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}" >/dev/null

    restore_policy
    trap - EXIT
fi

# The private test instances bind high ports, but a system-wide Dovecot/Postfix would still answer on
# 25/143/110 and confuse anyone debugging; stop them if running. Only the system instances are
# targeted: their pid files under /run, never the private instances under /tmp.
stop_system_daemon() {
    local name="$1" pidfile="$2" pid
    shift 2
    pid="$(head -n1 "$pidfile" 2>/dev/null | tr -d ' ' || true)"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        say "stopping system-wide $name (pid $pid)"
        "$@" >/dev/null 2>&1 || kill "$pid" 2>/dev/null || true
    else
        say "system-wide $name not running"
    fi
}
stop_system_daemon dovecot /run/dovecot/master.pid doveadm stop
stop_system_daemon postfix /var/spool/postfix/pid/master.pid postfix -c /etc/postfix stop

# Disable the units so a later boot (or systemd-less service call) does not bring them back.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now dovecot.service postfix.service >/dev/null 2>&1 || true
    say "disabled dovecot/postfix systemd units"
fi

for bin in dovecot doveadm postfix postconf curl swaks mbsync openssl chromium nginx; do
    command -v "$bin" >/dev/null || { say "ERROR: $bin not found after install" >&2; exit 1; }
done
say "done: $(dovecot --version | cut -d' ' -f1) dovecot, postfix $(postconf -d -h mail_version)"
