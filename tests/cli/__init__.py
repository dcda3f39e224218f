"""The ``cachemw`` command, run as operators run it."""
