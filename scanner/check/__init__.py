"""Checks on what a scan found: pure functions over bytes and profiles (no I/O)."""
