"""The ``spasemsr`` command line: runs the service's processes and talks to a running service."""
