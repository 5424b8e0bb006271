"""The sans-I/O vchan protocol: wire layout, ring state and framing.  No fds, no waits."""
