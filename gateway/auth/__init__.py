"""Providers, refresh coordination and CSRF."""
