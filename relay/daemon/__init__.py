"""``opsrelay serve``: the relay (subscriptions -> mail -> delivery), its reconnecting loop, and the
relay hosted inside ``opsrelay listen -m`` (crashmail's drop-in)."""
