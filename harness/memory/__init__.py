"""Stage 3: hotplug operations, observations of the guest, first-principles expectations and checks."""
