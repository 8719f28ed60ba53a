"""The data of Integration Hub: settings, the database, its tables and their rules.

This package imports nothing else of the hub; `worker` and `api_shim` build on it.
"""
