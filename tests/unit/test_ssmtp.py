"""ssmtp.conf and revaliases: Debian's packaged file, a Gmail-style one, and what the config takes."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import fast as fastconfig
from relay.config import ssmtp
from relay.config.models import Security, SendmailMode, load_config, ssmtp_notes
from relay.errors import ConfigError

# /etc/ssmtp/ssmtp.conf as Debian's ssmtp 2.64 postinst writes it (debconf defaults; hostname is the host's).
DEBIAN_SSMTP_CONF = """\
#
# Config file for sSMTP sendmail
#
# The person who gets all mail for userids < 1000
# Make this empty to disable rewriting.
root=postmaster

# The place where the mail goes. The actual machine name is required no\x20
# MX records are consulted. Commonly mailhosts are named mail.domain.com
mailhub=mail

# Where will the mail seem to come from?
#rewriteDomain=

# The full hostname
hostname=web1.example.org

# Are users allowed to set their own From: address?
# YES - Allow the user to specify their own From: address
# NO - Use the system generated From: address
#FromLineOverride=YES
"""

DEBIAN_REVALIASES = """\
# sSMTP aliases
#\x20
# Format:\tlocal_account:outgoing_address:mailhub
#
# Example: root:your_login@your.domain:mailhub.your.domain[:port]
# where [:port] is an optional port number that defaults to 25.
"""

GMAIL_SSMTP_CONF = """\
# The user that gets all the mails (UID < 1000, usually the admin)
root=alerts.team@gmail.com
mailhub=smtp.gmail.com:587
rewriteDomain=gmail.com
hostname=web1.example.org
UseTLS=Yes
UseSTARTTLS=Yes
AuthUser=alerts.team@gmail.com
AuthPass=app-password-16ch
AuthMethod=LOGIN
FromLineOverride=YES
TLS_CA_File=/etc/ssl/certs/ca-certificates.crt
"""

GMAIL_REVALIASES = """\
root:alerts.team@gmail.com:smtp.gmail.com:587
www-data:web.alerts@gmail.com:smtp.gmail.com:587
backup:backups   # no domain: ssmtp appends rewriteDomain
"""


def write(tmp_path: Path, conf: str, revaliases: str | None, toml: str = "") -> Path:
    folder = tmp_path / "ssmtp"
    folder.mkdir()
    (folder / "ssmtp.conf").write_text(conf)
    if revaliases is not None:
        (folder / "revaliases").write_text(revaliases)
    config = tmp_path / "opsrelay.toml"
    config.write_text(f'[smtp]\nssmtp_conf = "{folder / "ssmtp.conf"}"\n{toml}')
    return config


def test_debian_default_file_parses() -> None:
    conf = ssmtp.parse_conf(DEBIAN_SSMTP_CONF)
    assert (conf.root, conf.mailhub, conf.port, conf.hostname) == ("postmaster", "mail", None, "web1.example.org")
    assert conf.rewrite_domain is None and conf.from_line_override is None
    assert conf.security == "none" and conf.auth_user is None
    assert ssmtp.parse_revaliases(DEBIAN_REVALIASES) == {}


def test_debian_default_as_opsrelay_config(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, DEBIAN_SSMTP_CONF, DEBIAN_REVALIASES), env={})
    # ssmtp's default is clear text; to a host other than this one we keep STARTTLS required.
    assert (cfg.smtp.host, cfg.smtp.effective_port, cfg.smtp.security) == ("mail", 25, Security.STARTTLS)
    assert cfg.smtp.username == "" and cfg.smtp.helo == "web1.example.org"
    # root=postmaster has no domain: ssmtp appends hostname (no rewriteDomain).
    assert cfg.aliases == {"*": "postmaster@web1.example.org"}
    assert cfg.sendmail.domain == "web1.example.org"
    assert cfg.sendmail.from_line_override is False  # ssmtp's default when the key is commented out
    assert cfg.sendmail.senders == {}


def test_gmail_style_file_parses() -> None:
    conf = ssmtp.parse_conf(GMAIL_SSMTP_CONF)
    assert (conf.mailhub, conf.port, conf.rewrite_domain) == ("smtp.gmail.com", 587, "gmail.com")
    assert conf.security == "starttls"
    assert (conf.auth_user, conf.auth_pass, conf.auth_method) == ("alerts.team@gmail.com", "app-password-16ch", "LOGIN")
    assert conf.from_line_override is True and conf.tls_ca_file == "/etc/ssl/certs/ca-certificates.crt"
    assert ssmtp.parse_revaliases(GMAIL_REVALIASES) == {
        "root": ("alerts.team@gmail.com", "smtp.gmail.com", 587),
        "www-data": ("web.alerts@gmail.com", "smtp.gmail.com", 587),
        "backup": ("backups", None, None),
    }


def test_gmail_style_as_opsrelay_config(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GMAIL_SSMTP_CONF, GMAIL_REVALIASES), env={})
    smtp = cfg.smtp
    assert (smtp.host, smtp.effective_port, smtp.security) == ("smtp.gmail.com", 587, Security.STARTTLS)
    assert (smtp.username, smtp.secret) == ("alerts.team@gmail.com", "app-password-16ch")
    assert str(smtp.ca_file) == "/etc/ssl/certs/ca-certificates.crt"
    assert "app-password" not in repr(cfg)
    assert cfg.aliases == {"*": "alerts.team@gmail.com"}
    assert cfg.sendmail.domain == "gmail.com" and cfg.sendmail.from_line_override is True
    assert cfg.sendmail.senders == {"root": "alerts.team@gmail.com", "www-data": "web.alerts@gmail.com",
                                    "backup": "backups@gmail.com"}


def test_the_notes_say_what_was_taken_and_never_the_password(tmp_path: Path) -> None:
    notes = ssmtp_notes(write(tmp_path, GMAIL_SSMTP_CONF, GMAIL_REVALIASES), env={})
    assert "mailhub -> smtp.host = 'smtp.gmail.com'" in notes
    assert "mailhub port -> smtp.port = 587" in notes
    assert "AuthPass -> smtp.password = ******" in notes
    assert any(n.startswith("AuthMethod=LOGIN: not needed") for n in notes)
    assert "revaliases root -> sendmail.senders.root = 'alerts.team@gmail.com'" in notes
    assert not any("app-password" in n for n in notes)


def test_opsrelay_toml_and_environment_win_over_ssmtp(tmp_path: Path) -> None:
    toml = 'host = "relay.example.net"\nport = 2525\nsecurity = "tls"\npassword = "from-toml"\n' \
           '[aliases]\n"*" = "ops@example.net"\n[sendmail]\nfrom_line_override = false\n' \
           '[sendmail.senders]\nroot = "root-toml@example.net"\n'
    path = write(tmp_path, GMAIL_SSMTP_CONF, GMAIL_REVALIASES, toml)
    cfg = load_config(path, env={"OPSRELAY_SMTP__USERNAME": "env-user"})
    assert (cfg.smtp.host, cfg.smtp.port, cfg.smtp.security) == ("relay.example.net", 2525, Security.TLS)
    assert (cfg.smtp.username, cfg.smtp.secret) == ("env-user", "from-toml")
    assert cfg.aliases == {"*": "ops@example.net"}
    assert cfg.sendmail.from_line_override is False
    assert cfg.sendmail.senders["root"] == "root-toml@example.net"
    assert cfg.sendmail.senders["www-data"] == "web.alerts@gmail.com"
    notes = ssmtp_notes(path, env={"OPSRELAY_SMTP__USERNAME": "env-user"})
    assert "AuthUser: not used, smtp.username is set in opsrelay.toml or the environment" in notes


def test_ssmtp_is_read_as_ssmtp_reads_it() -> None:
    conf = ssmtp.parse_conf("MAILHUB = hub.example:2525 # comment\nuseStartTLS=yes\nUSETLS=YES\n"
                            "rewritedomain=user@example.com\nRemotePort=465\nUseTLSCert=YES\nno equals sign\n")
    assert (conf.mailhub, conf.port, conf.security) == ("hub.example", 465, "starttls")
    assert conf.rewrite_domain == "example.com"  # ssmtp takes what follows the @
    assert conf.ignored == ["UseTLSCert"]
    assert ssmtp.parse_conf("UseTLS=YES\n").security == "tls"
    assert ssmtp.parse_conf("UseSTARTTLS=YES\nUseTLS=NO\n").security == "none"  # ssmtp: UseTLS=NO clears both


def test_a_bad_port_names_its_line() -> None:
    with pytest.raises(ssmtp.SsmtpError, match=r"ssmtp\.conf line 2: 'smtp' is not a port number"):
        ssmtp.parse_conf("root=x\nmailhub=host:smtp\n")


def test_clear_text_auth_to_a_remote_host_is_never_taken_over(tmp_path: Path) -> None:
    # ssmtp would send this password in clear text; opsrelay keeps STARTTLS required (fails closed).
    conf = "mailhub=smtp.example.com:25\nAuthUser=u@example.com\nAuthPass=secret\n"
    path = write(tmp_path, conf, None)
    cfg = load_config(path, env={})
    assert cfg.smtp.security is Security.STARTTLS
    notes = ssmtp_notes(path, env={})
    assert any("ssmtp used clear text" in note for note in notes)
    assert not any("secret" in note for note in notes)


def test_security_none_to_a_remote_host_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "opsrelay.toml"
    config.write_text('[smtp]\nhost = "smtp.example.com"\nsecurity = "none"\n')
    with pytest.raises(ConfigError, match=r"clear text to 'smtp\.example\.com'"):
        load_config(config, env={})


def test_a_missing_file_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "opsrelay.toml"
    config.write_text(f'[smtp]\nssmtp_conf = "{tmp_path / "nope.conf"}"\n')
    with pytest.raises(ConfigError, match=r"smtp\.ssmtp_conf: cannot read .*nope\.conf: No such file"):
        load_config(config, env={})


def test_tls_ca_dir_and_per_user_mailhubs_are_explained(tmp_path: Path) -> None:
    conf = "mailhub=hub.example:587\nUseSTARTTLS=YES\nTLS_CA_Dir=/etc/ssl/certs\n"
    notes = ssmtp_notes(write(tmp_path, conf, "root:me@example.com:other.example:465\n"), env={})
    assert "TLS_CA_Dir=/etc/ssl/certs: the system trust store, trusted already" in notes
    assert "revaliases root: mailhub other.example:465 not used, all mail goes through smtp.host" in notes
    other = ssmtp.merge_into({}, ssmtp.parse_conf("TLS_CA_Dir=/opt/ca\n"))[1]
    assert "TLS_CA_Dir=/opt/ca: not used; put the CA in smtp.ca_file (the system trust store is always used)" in other


def test_sendmail_section_defaults(tmp_path: Path) -> None:
    config = tmp_path / "opsrelay.toml"
    config.write_text('[sendmail]\nmode = "direct"\nmax_size = "10MiB"\n')
    cfg = load_config(config, env={})
    assert cfg.sendmail.mode is SendmailMode.DIRECT and cfg.sendmail.max_size == 10 * 2**20
    config.write_text("")
    default = load_config(config, env={}).sendmail
    assert (default.mode, default.max_size, default.domain, default.from_line_override, default.senders) == (
        SendmailMode.QUEUE, 25_000_000, "", True, {})
    config.write_text('[sendmail]\nmax_size = "lots"\n')
    with pytest.raises(ConfigError, match=r"sendmail\.max_size: 'lots' is not a size"):
        load_config(config, env={})


def test_the_migration_example_reads_a_gmail_style_ssmtp(tmp_path: Path) -> None:
    example = Path(__file__).parents[2] / "config" / "ssmtp-migration.toml"
    conf = write(tmp_path, GMAIL_SSMTP_CONF, GMAIL_REVALIASES).parent / "ssmtp" / "ssmtp.conf"
    config = tmp_path / "migrated.toml"
    config.write_text(example.read_text().replace("/etc/ssmtp/ssmtp.conf", str(conf)))
    cfg = load_config(config, env={})
    assert (cfg.smtp.host, cfg.smtp.effective_port, cfg.smtp.security) == ("smtp.gmail.com", 587, Security.STARTTLS)
    assert cfg.sendmail.max_size == 25_000_000 and cfg.sendmail.mode is SendmailMode.QUEUE
    assert cfg.sendmail.senders["root"] == "alerts.team@gmail.com"
    fast = fastconfig.load({"OPSRELAY_CONFIG": str(config)})
    assert (fast.domain, fast.senders, fast.aliases, fast.from_line_override) == (
        "gmail.com", cfg.sendmail.senders, cfg.aliases, True)
