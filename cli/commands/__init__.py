"""The ``spasemsr`` commands, one module per concern; importing one registers its commands."""
