"""Naive reference oracles and test helpers; never imported by the runtime."""
