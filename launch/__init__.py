"""Launchers: `local.py` runs every role of an experiment on one machine."""
