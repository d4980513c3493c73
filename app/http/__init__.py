"""The HTTP front end: an app factory and routers per concern; the governed path itself is
app/pipeline.py, which this package only translates to and from."""

from app.http.app import create_app

__all__ = ["create_app"]
