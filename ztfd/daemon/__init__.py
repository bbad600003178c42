"""The daemon: the supervisor, how every process starts, stops and backs off, its pidfile, and housekeeping."""
