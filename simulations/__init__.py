"""The local harness: simulated hospitals on one machine, baselines, and the ``fedcare`` CLI."""
