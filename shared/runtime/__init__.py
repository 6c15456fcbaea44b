"""What the daemons (and balloonctl) share besides the protocol: channel addresses, layered
settings (command line over environment over file), the log line format, and where a
host's admin token is. Plain Python, no protocol state: the sans-IO core (``shared``)
never imports it.
"""
