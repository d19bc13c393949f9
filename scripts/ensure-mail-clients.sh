#!/usr/bin/env bash
# Install the real mail clients the sendmail end-to-end tests drive, when missing. Idempotent.
# Used by `make test` (before pytest) and so by `.ci/run`.
#
#   bsd-mailx   Debian's `mail -s` (what cron and most scripts reach for)
#   git-email   `git send-email --sendmail-cmd`, with libmailtools-perl: Debian's git-send-email
#               refuses to start without Mail::Address (only Recommended by the package)
#   ssmtp       satisfies bsd-mailx's dependency on a mail-transport-agent without a
#               daemon (otherwise apt pulls in exim4, which listens on :25); it is also
#               the incumbent the sendmail benchmark compares with
#   msmtp       the other incumbent of that benchmark (the binary only, not msmtp-mta,
#               which would conflict with ssmtp over /usr/sbin/sendmail)
#
# None of them is configured to deliver anywhere: the tests point each client at
# opsrelay-sendmail explicitly.
set -euo pipefail

need=()
command -v bsd-mailx >/dev/null 2>&1 || need+=(bsd-mailx)
[ -x "$(git --exec-path)/git-send-email" ] || need+=(git-email)
perl -MMail::Address -e 1 >/dev/null 2>&1 || need+=(libmailtools-perl)
command -v ssmtp >/dev/null 2>&1 || need+=(ssmtp)
command -v msmtp >/dev/null 2>&1 || need+=(msmtp)

if [ "${#need[@]}" -eq 0 ]; then
    exit 0
fi

echo "ensure-mail-clients: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
# --no-install-recommends: git-email's Perl SMTP/TLS modules are not needed with --sendmail-cmd.
apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
