"""Distributed apps built on the dreamcache library: Ray Data jobs and the Ray Serve app."""
