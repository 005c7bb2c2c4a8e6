"""Encoded updates through real Flower records: built, deflated to bytes, inflated, decoded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from pilot.errors import BadUpdate
from pilot.federated import UpdateCodec, from_records, serialized_nbytes, to_records

CODECS = [UpdateCodec("fp32"), UpdateCodec("bf16"), UpdateCodec("int8", None), UpdateCodec("int8", 256)]


def through_flower(content: RecordDict) -> RecordDict:
    """What a Flower message does to its content: deflate every object to bytes, inflate them back."""
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(content).items()}
    inflated = inflate_object_from_contents(content.object_id, contents)
    assert isinstance(inflated, RecordDict)
    return inflated


def delta() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    return {"transformer.wte.weight": torch.randn(40, 16, generator=gen) * 1e-3,
            "lm_head.weight": torch.randn(16, 40, generator=gen), "norm.w": torch.randn(3, generator=gen)}


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: f"{c.kind}-{c.block_size}")
def test_each_encoding_survives_a_real_flower_round_trip(codec: UpdateCodec) -> None:
    encoded, _ = codec.encode(delta())
    arrays, meta = to_records(encoded)
    received = through_flower(RecordDict({"update": arrays, "update-meta": meta}))
    decoded = codec.decode(from_records(received.array_records["update"], received.config_records["update-meta"]))
    expected = codec.decode(encoded)  # what the trainer's own decode (and its residual) assumed
    assert list(decoded) == list(delta())
    for name, tensor in expected.items():
        assert decoded[name].dtype == torch.float32
        assert torch.equal(decoded[name], tensor), name
    wire = serialized_nbytes(arrays)
    # per array: np.save header (128 B), chunk + Array headers, the record entry (sha256 ids): ~400 B
    assert encoded.num_bytes + 128 * len(encoded.arrays) < wire < encoded.num_bytes + 500 * len(encoded.arrays) + 200


def test_int8_block_is_about_a_quarter_of_fp32_on_the_wire() -> None:
    big = {"w": torch.randn(64, 256)}
    fp32 = serialized_nbytes(to_records(UpdateCodec("fp32").encode(big)[0])[0])
    int8 = serialized_nbytes(to_records(UpdateCodec("int8", 256).encode(big)[0])[0])
    # payload: 4·16384 vs 16384 + 4·64 bytes
    assert 0.25 < int8 / fp32 < 0.27


def test_unreadable_array_is_a_bad_update() -> None:
    encoded, _ = UpdateCodec("int8", 256).encode(delta())
    arrays, meta = to_records(encoded)
    arrays["norm.w"] = Array(dtype="int8", shape=(3,), stype="torch.raw", data=b"\x01\x02\x03")
    with pytest.raises(BadUpdate, match="array 'norm.w' cannot be read"):
        from_records(arrays, meta)


def test_missing_array_after_transport_is_a_bad_update() -> None:
    encoded, _ = UpdateCodec("bf16").encode(delta())
    arrays, meta = to_records(encoded)
    del arrays["lm_head.weight"]
    with pytest.raises(BadUpdate, match="'lm_head.weight' is missing"):
        from_records(arrays, meta)
    wrong = ArrayRecord({k: Array(np.zeros(a.shape, np.float32)) for k, a in encoded.to_arrays().items()})
    with pytest.raises(BadUpdate, match="payload dtype float32 is not int16"):
        from_records(wrong, ConfigRecord(dict(encoded.metadata())))
