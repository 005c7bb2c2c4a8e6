"""Pilot's data pipeline: parquet shards in, token batches out.

- ``shards``       the FineWeb-EDU layout (``shard_NNNNN.parquet``, last = validation),
                   ``list_shards``, ``work_units`` / ``resolve_unit`` (ledger unit keys), ``dataset_info``
- ``text_import``  local text → shards (``import_text``), ``resolve_data`` for ``--data FILE``
- ``download``     FineWeb-EDU shards from the Hugging Face hub (``download_fineweb``)
- ``loader``       ``TokenLoader`` with a resumable ``LoaderCursor``; ``iter_unit_batches``
                   for the federated trainers' leased row groups
- ``validation``   ``validation_batches``: the whole split or a seeded sample
- ``split``        the shakespeare task's character split: ``split_text`` (90/10),
                   contiguous ``partition_text``, ``train_text``, ``write_split`` (``pilot data split``)

Import from here (``from pilot.data import TokenLoader``); the submodules are the
implementation.
"""

from __future__ import annotations

from pilot.data.download import FINEWEB_BASE_URL, download_fineweb
from pilot.data.loader import (
    IGNORE_INDEX,
    LoaderCursor,
    TokenLoader,
    UnitBatch,
    count_unit_tokens,
    iter_unit_batches,
    tokenize_documents,
)
from pilot.data.shards import (
    TEXT_COLUMN,
    DatasetInfo,
    ShardMeta,
    WorkUnit,
    dataset_info,
    list_shards,
    read_row_group,
    resolve_unit,
    shard_name,
    work_units,
)
from pilot.data.split import partition_bounds, partition_text, split_text, train_text, write_split
from pilot.data.text_import import ShardSummary, import_text, resolve_data, split_documents
from pilot.data.validation import ValidationSet, validation_batches

__all__ = [
    "FINEWEB_BASE_URL",
    "IGNORE_INDEX",
    "TEXT_COLUMN",
    "DatasetInfo",
    "LoaderCursor",
    "ShardMeta",
    "ShardSummary",
    "TokenLoader",
    "UnitBatch",
    "ValidationSet",
    "WorkUnit",
    "count_unit_tokens",
    "dataset_info",
    "download_fineweb",
    "import_text",
    "iter_unit_batches",
    "list_shards",
    "partition_bounds",
    "partition_text",
    "read_row_group",
    "resolve_data",
    "resolve_unit",
    "shard_name",
    "split_documents",
    "split_text",
    "tokenize_documents",
    "train_text",
    "validation_batches",
    "work_units",
    "write_split",
]
