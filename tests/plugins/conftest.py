# The packages here are installed and imported by tests/test_dispatch_plugins.py
# in a separate interpreter; pytest must not import them (one fails on purpose).
collect_ignore_glob = ["*"]
