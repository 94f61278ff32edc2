"""``batchtag serve``: a local implementation of the image-tag API.

The public surface used by the CLI and by the client's embedded mode is re-exported here.
"""

from batchtag.server.app import create_app
from batchtag.server.config import ServeConfig
from batchtag.server.credentials import load_credentials_file, throwaway_credentials
from batchtag.server.runner import RunningServer, serve_forever, start_server

__all__ = [
    "RunningServer",
    "ServeConfig",
    "create_app",
    "load_credentials_file",
    "serve_forever",
    "start_server",
    "throwaway_credentials",
]
