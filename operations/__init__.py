"""Running the programs: which programs there are and where their settings
live (`programs`), waiting for them to be SERVING (`readiness`), and restarting
the one that keeps failing (`watchdog`, with its cache `cleanup`). The top of the
tree: it names every program, so nothing below imports it."""
