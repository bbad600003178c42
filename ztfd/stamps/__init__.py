"""Stamps: the fetcher role (claims stamp jobs; fetches, checks and writes stamps; draws previews), its providers,
and replay."""
