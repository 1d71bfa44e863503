"""Merge server: fold checkpoints as they arrive (inbox directory and HTTP uploads).

``contmerge serve`` (cli.py) wires a MergeService (service.py), the one object the HTTP layer
(app.py, auth.py) calls: one writer thread owning the Merger (worker.py), fed by a bounded queue
(workqueue.py) from HTTP uploads (upload.py: each upload's life, from its first byte to queued
or refused; bodycheck.py: what a body must be; tarball.py: tar uploads) made durable in the
spool (spool.py), and from a watched inbox (inbox.py). Every arrival is written to an fsync'd
journal (journal.py, whose JournalRecord builds every line); status.py and metrics.py say what
happened. client.py and launcher.py drive a server from Python (tests, benchmarks, scripts).
"""
