"""The command line, the HTTP server and its page."""
