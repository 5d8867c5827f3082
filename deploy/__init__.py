"""Launchers: local processes (`disagg serve`) and, later, Ray. Both read the same cluster YAML."""
