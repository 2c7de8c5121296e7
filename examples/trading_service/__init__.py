"""A small trading service that writes its alerts through the outbox.

See README.md in this folder.
"""
