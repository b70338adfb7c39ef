"""Test bed helpers: tiny model maker, local SGLang cluster, CPU shims.

Used by tests, benchmarks and the demo; never by production paths.
"""
