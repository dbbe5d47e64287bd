"""The HTTP routers of the service."""
