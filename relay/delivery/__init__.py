"""Mail to the smarthost: the pure plan (:mod:`.plan`), the outcome types and Mailer interface
(:mod:`.outcome`), the aiosmtplib pool (:mod:`.smtp`)."""
