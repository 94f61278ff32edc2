"""The server's tagging pipeline inside the client's process, without HTTP.

``batchtag run`` with no endpoint tags with a local model. Going through a loopback HTTP
server cost it, for every image, a base64 encode, a JSON body, a socket round trip, a JSON
parse and a strict base64 decode, all on the same two cores as the model: about a third of
the CPU of a 4000x3000 photo. Here the client hands the image's bytes (or its url) straight
to the same decode -> prepare -> batch -> tag calls a POST makes, and gets the same answer
codes back as ``ApiError``. Signature and quota are skipped: the caller is this process.
"""

from __future__ import annotations

from batchtag.server.config import ServeConfig
from batchtag.server.service import ServerState, create_state, tag_source
from batchtag.taggers import Tag, Tagger


class EmbeddedService:
    """``async with EmbeddedService(config) as service: await service.tag(image=data)``."""

    def __init__(self, config: ServeConfig, tagger: Tagger | None = None) -> None:
        self.state: ServerState = create_state(config, tagger)

    async def __aenter__(self) -> EmbeddedService:
        await self.state.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.state.close()

    async def tag(self, image: bytes | None = None, url: str | None = None) -> list[Tag]:
        """Tags for raw image bytes or a url; raises ``ApiError`` with the API's code."""
        return await tag_source(self.state, image, url)
