"""The HTTP side of the hub: the FastAPI app, its routes, and the command line."""
