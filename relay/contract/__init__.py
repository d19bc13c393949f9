"""What travels between the parts: events, outbound mail and its envelope, dead-letter fields,
queue names and layout, routing keys, broker URLs. Standard library only; no engine, SMTP or config."""
