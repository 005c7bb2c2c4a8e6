"""The Tokenizer gRPC service (``pilot.v1.Tokenizer`` in proto/pilot/v1/services.proto).

It serves one artifact directory (any kind ``load_tokenizer`` knows; a BPE in practice):

- ``GetTokenizer{name, if_none_match}``: the ``tokenizer.json`` bytes, the hex
  sha256 of those bytes, the tokenizer's name and vocab size. When
  ``if_none_match`` equals that sha256 the answer is ``not_modified`` with an
  empty artifact. ``name`` must be empty or the served tokenizer's name
  (``bpe65536``), else NOT_FOUND.
- ``Encode{texts, prepend_bos}``: ids per text, as the local tokenizer gives them.
- ``Decode{ids}``: text per id sequence; an id outside the vocabulary is
  INVALID_ARGUMENT naming the id.

Bounded work per call: at most ``MAX_TEXTS`` texts / sequences, ``MAX_TEXT_CHARS``
characters in all (Encode) and ``MAX_IDS`` ids in all (Decode); above that the
call is INVALID_ARGUMENT naming the limit. A message above the gRPC limit
(``DEFAULT_MAX_MESSAGE_BYTES``, 64 MiB) never reaches this code: gRPC answers
RESOURCE_EXHAUSTED. Either way the server goes on serving.

:func:`serve_tokenizer` starts it with the shared plumbing (health service,
size limits, optional TLS from ``$PILOT_TLS_*``); ``pilot tokenizer serve`` runs
it until SIGTERM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import grpc

from pilot.errors import PilotError, TokenizerError
from pilot.grpc_util import GrpcServer, TLSConfig, start_grpc_server
from pilot.hashing import sha256_bytes
from pilot.log import get_logger
from pilot.tokenizer import Tokenizer, artifact_file, load_tokenizer
from pilot.v1 import services_pb2 as svc
from pilot.v1 import services_pb2_grpc as svc_grpc

log = get_logger(__name__)

MAX_TEXTS = 10_000
"""Texts per Encode (and id sequences per Decode) call."""
MAX_TEXT_CHARS = 4 << 20
"""Characters per Encode call, all texts together (4 MiB of text)."""
MAX_IDS = 4 << 20
"""Token ids per Decode call, all sequences together."""
ENCODE_THREADS = 4


@dataclass(frozen=True)
class ServedArtifact:
    """An artifact as served: the loaded tokenizer and the exact file bytes it came from."""

    tokenizer: Tokenizer
    data: bytes  # tokenizer.json, byte for byte
    sha256: str  # of ``data``

    @classmethod
    def load(cls, path: str | Path) -> ServedArtifact:
        """Load ``path`` (artifact directory or its tokenizer.json), verifying its checksum."""
        file = artifact_file(path)
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise TokenizerError(f"cannot read tokenizer artifact {file}: {exc.strerror}") from None
        tokenizer = load_tokenizer(file)
        if json.loads(data).get("sha256") != tokenizer.sha256:  # replaced between the two reads
            raise TokenizerError(f"tokenizer artifact {file} changed while it was being loaded; try again")
        return cls(tokenizer, data, sha256_bytes(data))


class TokenizerService(svc_grpc.TokenizerServicer):
    """Serve one tokenizer artifact: its bytes, and encoding/decoding with it."""

    def __init__(self, artifact: ServedArtifact) -> None:
        self.artifact = artifact
        self.tokenizer = artifact.tokenizer

    def GetTokenizer(self, request: svc.GetTokenizerRequest, context: grpc.ServicerContext) -> svc.TokenizerArtifact:
        self._check_name(request.name, context)
        art, tok = self.artifact, self.tokenizer
        reply = svc.TokenizerArtifact(name=tok.name, sha256=art.sha256, vocab_size=tok.vocab_size)
        if request.if_none_match and request.if_none_match == art.sha256:
            reply.not_modified = True
        else:
            reply.artifact = art.data
        return reply

    def Encode(self, request: svc.EncodeRequest, context: grpc.ServicerContext) -> svc.EncodeResponse:
        self._check_name(request.name, context)
        texts = list(request.texts)
        if len(texts) > MAX_TEXTS:
            _abort(context, f"too many texts: {len(texts):,} in one Encode, the limit is {MAX_TEXTS:,}")
        chars = sum(map(len, texts))
        if chars > MAX_TEXT_CHARS:
            _abort(context, f"too much text: {chars:,} characters in one Encode, the limit is "
                            f"{MAX_TEXT_CHARS:,} ({MAX_TEXT_CHARS >> 20} MiB); split the batch")
        try:
            encoded = self.tokenizer.encode_batch(texts, num_threads=ENCODE_THREADS)
        except PilotError as exc:
            _abort(context, str(exc))
        bos = [self.tokenizer.bos_id] if request.prepend_bos else []
        return svc.EncodeResponse(ids=[svc.TokenIds(ids=bos + ids) for ids in encoded])

    def Decode(self, request: svc.DecodeRequest, context: grpc.ServicerContext) -> svc.DecodeResponse:
        self._check_name(request.name, context)
        if len(request.ids) > MAX_TEXTS:
            _abort(context, f"too many id sequences: {len(request.ids):,} in one Decode, the limit is {MAX_TEXTS:,}")
        total = sum(len(seq.ids) for seq in request.ids)
        if total > MAX_IDS:
            _abort(context, f"too many token ids: {total:,} in one Decode, the limit is {MAX_IDS:,}")
        texts = []
        for index, seq in enumerate(request.ids):
            try:
                texts.append(self.tokenizer.decode(list(seq.ids)))
            except PilotError as exc:
                _abort(context, f"sequence {index}: {exc}")
        return svc.DecodeResponse(texts=texts)

    def _check_name(self, name: str, context: grpc.ServicerContext) -> None:
        if name and name != self.tokenizer.name:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"no tokenizer named {name!r} here; this server serves {self.tokenizer.name!r}")


def _abort(context: grpc.ServicerContext, message: str) -> NoReturn:
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
    raise AssertionError("context.abort returned")  # grpc raises; this keeps type checkers honest


def serve_tokenizer(
    artifact: str | Path | ServedArtifact, address: str, *, tls: TLSConfig | None = None
) -> GrpcServer:
    """Start the Tokenizer service (plus health) on ``address`` (``host:port``; port 0 = a free one)."""
    served = artifact if isinstance(artifact, ServedArtifact) else ServedArtifact.load(artifact)
    server = start_grpc_server(
        [(svc_grpc.add_TokenizerServicer_to_server, TokenizerService(served))], address,
        tls=tls or TLSConfig.from_env(),
    )
    log.info("tokenizer service started", name=served.tokenizer.name, sha256=served.sha256,
             vocab_size=served.tokenizer.vocab_size, port=server.port)
    return server
