#!/usr/bin/env bash
# Create the unprivileged users the maildrop tests submit mail as, when missing. Idempotent.
# Used by `make pytest` (before pytest), so by `make test` and `.ci/run`; needs root.
#
#   opsrelay-t1 .. opsrelay-t4   ordinary users (uid >= 1000, a group of their own, a home
#                                directory /home/opsrelay-tN of mode 0700, no login shell);
#                                the tests run commands as them with `runuser -u USER --` or
#                                `setpriv --reuid ... --init-groups`, which need no shell.
#
# Each run checks what the tests rely on (the user, its group, its home and the home's owner
# and mode) and puts it right; a failure ends it non-zero with one line on stderr.
set -uo pipefail

USERS=(opsrelay-t1 opsrelay-t2 opsrelay-t3 opsrelay-t4)
NAMES=("Opsrelay Test One" "Opsrelay Test Two" "Opsrelay Test Three" "Opsrelay Test Four")

fail() {
    echo "ensure-test-users: $*" >&2
    exit 1
}

[ "$(id -u)" -eq 0 ] || fail "must run as root (it creates users)"
command -v useradd >/dev/null 2>&1 || fail "useradd (passwd) is not installed"
command -v runuser >/dev/null 2>&1 || fail "runuser (util-linux) is not installed"
command -v setpriv >/dev/null 2>&1 || fail "setpriv (util-linux) is not installed"
nologin=/usr/sbin/nologin
[ -x "$nologin" ] || nologin=/bin/false

for i in "${!USERS[@]}"; do
    user=${USERS[$i]}
    home=/home/$user
    if ! getent passwd "$user" >/dev/null; then
        echo "ensure-test-users: creating $user" >&2
        out=$(useradd --create-home --home-dir "$home" --shell "$nologin" --user-group \
            --comment "${NAMES[$i]}" "$user" 2>&1) || fail "useradd $user failed: ${out//$'\n'/ }"
    fi
    entry=$(getent passwd "$user") || fail "$user is not in the passwd database after useradd"
    uid=$(cut -d: -f3 <<<"$entry")
    gid=$(cut -d: -f4 <<<"$entry")
    actual_home=$(cut -d: -f6 <<<"$entry")
    [ "$uid" -ge 1000 ] || fail "$user exists with uid $uid, a system uid (the tests want an ordinary user)"
    [ "$actual_home" = "$home" ] || fail "$user exists with home $actual_home, not $home"
    if [ ! -d "$home" ]; then
        mkdir -p "$home" || fail "cannot create $home"
    fi
    chown "$uid:$gid" "$home" || fail "cannot chown $home to $user"
    chmod 0700 "$home" || fail "cannot chmod $home"
    # They must be able to run a command (no shell involved) and see their own home.
    runuser -u "$user" -- test -O "$home" -a -w "$home" 2>/dev/null \
        || fail "runuser -u $user -- cannot run a command that owns and writes $home"
done
exit 0
