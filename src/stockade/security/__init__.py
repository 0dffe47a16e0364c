"""Hostile-input defence: the hidden-payload policy, quarantine and the file scanner."""
