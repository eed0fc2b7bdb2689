"""Shared test kit: fakes, fuzzers, key sets and real-process helpers. No tests here."""
