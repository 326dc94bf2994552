"""The contract shared by the API and the worker: settings, errors, jobs, queue, storage.

Never imports torch (the API image has none; DESIGN 3.1).
"""
