"""From events to notices: subscription selectors, the pure notifier (digests, damping, recovery),
its state, and the keeper that holds that state in a single-active-consumer queue."""
