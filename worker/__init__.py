"""The worker: the only package that joins the model and the queue (DESIGN 3.1)."""
