"""Merge server: fold checkpoints as they arrive (inbox directory and HTTP uploads).

``contmerge serve`` (cli.py) wires a MergeService (service.py): one writer thread owning the
Merger (worker.py), fed by a bounded queue (workqueue.py) from HTTP uploads made durable in the
spool (spool.py, app.py, auth.py) and from a watched inbox (inbox.py); every arrival is written
to an fsync'd journal (journal.py); status.py and metrics.py say what happened. client.py and
launcher.py drive a server from Python (tests, benchmarks, scripts).
"""
