"""FastAPI dashboard and API. Never imports ``service.inference`` or ``service.worker``."""
