"""Carrying an ``EncodedUpdate`` inside Flower records, and measuring what Flower would send.

- ``to_records(encoded) -> (ArrayRecord, ConfigRecord)``: the trainer puts both in its reply's ``RecordDict``
  (e.g. under ``"update"`` and ``"update-meta"``).
- ``from_records(array_record, config_record) -> EncodedUpdate``: the coordinator's side; every malformed part
  (an array Flower cannot turn back into numpy, missing metadata, a wrong dtype or scale count) raises
  ``BadUpdate`` with the reason.
- ``serialized_nbytes(record)``: bytes of the record's deflated Flower objects (the record, each ``Array``'s
  header, and its ``ArrayChunk``s, identical chunks counted once): what Flower 1.41 pushes over gRPC for it.

Flower is imported lazily, so ``pilot.federated`` stays importable (and fast to import) without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pilot.errors import BadUpdate
from pilot.federated.codec import EncodedUpdate

if TYPE_CHECKING:
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.supercore.inflatable.inflatable_object import InflatableObject


def to_records(encoded: EncodedUpdate) -> tuple[ArrayRecord, ConfigRecord]:
    """The Flower records that carry ``encoded``: its arrays and its metadata."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    arrays = ArrayRecord({key: Array(value) for key, value in encoded.to_arrays().items()})
    return arrays, ConfigRecord(dict(encoded.metadata()))  # type: ignore[arg-type]


def from_records(array_record: ArrayRecord, config_record: ConfigRecord | dict[str, Any]) -> EncodedUpdate:
    """Rebuild the update a trainer sent; ``BadUpdate`` names what is malformed."""
    arrays = {}
    for key, array in array_record.items():
        try:
            arrays[key] = array.numpy()
        except (TypeError, ValueError, OSError, EOFError) as exc:
            raise BadUpdate(f"array {key!r} cannot be read as a numpy array: {exc}") from exc
    return EncodedUpdate.from_arrays(arrays, dict(config_record))


def serialized_nbytes(record: InflatableObject) -> int:
    """Bytes of every deflated object under ``record`` (itself included), as Flower transmits them."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(record).values())
