"""Shared-prefix decoding, scoring, rewards, advantages and losses."""
