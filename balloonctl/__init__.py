"""balloonctl: the command-line client of balloon-host's admin API.

A package of its own beside the daemons: it speaks HTTP to a running host and imports
nothing from ``host_daemon`` (the admin token's location is shared/runtime/admin_token.py's rule).
"""
