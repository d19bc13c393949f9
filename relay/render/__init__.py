"""From notices to mail: the Jinja2 renderer, the variables templates see, the MIME builder, the
built-in templates."""
