"""`pilot model` commands: inspect model presets without allocating their weights.

- ``pilot model info --preset d20 [--vocab-size 65536] [--seq-len 2048] [--json]``: parameter count, config,
  training FLOPs per token and every parameter's shape, computed on the meta device (a d32 costs no memory).

A bad preset or field prints one line on stderr and exits with code 2.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import typer

DEFAULT_VOCAB_SIZE = 65536


def _model_info(preset: str, vocab_size: int, seq_len: int | None) -> dict[str, Any]:
    from pilot.model import meta_model, preset_config

    cfg = preset_config(preset, vocab_size=vocab_size, sequence_len=seq_len)
    model = meta_model(cfg)
    shapes = {name: list(p.shape) for name, p in model.named_parameters()}
    groups = model.param_groups()
    return {
        "preset": preset,
        "parameters": sum(p.numel() for p in model.parameters()),
        "matrix_parameters": sum(p.numel() for p in groups.matrix),
        "embedding_parameters": sum(p.numel() for p in groups.embedding),
        "unembedding_parameters": sum(p.numel() for p in groups.unembedding),
        "flops_per_token": model.estimate_flops_per_token(),
        "config": cfg.to_dict(),
        "shapes": shapes,
    }


def _print_text(info: dict[str, Any]) -> None:
    print(f"preset            {info['preset']}")
    print(f"parameters        {info['parameters']:,}")
    print(f"  matrix (Muon)   {info['matrix_parameters']:,}")
    print(f"  embedding       {info['embedding_parameters']:,}")
    print(f"  unembedding     {info['unembedding_parameters']:,}")
    print(f"flops/token       {info['flops_per_token']:,} (training, fwd+bwd)")
    print("config")
    for key, value in info["config"].items():
        print(f"  {key:<16}{value}")
    print("shapes (h.* = each of the n_layer blocks)")
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in info["shapes"].items():
        shapes.setdefault(re.sub(r"\.h\.\d+\.", ".h.*.", name), tuple(shape))
    width = max(len(name) for name in shapes)
    for name, shape in shapes.items():
        print(f"  {name:<{width}}  {shape}")


def register(app: typer.Typer) -> None:
    """Add the `model` command group to the main `pilot` app."""
    model_app = typer.Typer(help="Inspect model presets (sizes, shapes, FLOPs) without allocating weights.",
                            no_args_is_help=True)

    @model_app.command("info")
    def info(
        preset: str = typer.Option(..., "--preset", help="d<N> (e.g. d2, d20, d32) or shakespeare-char"),
        vocab_size: int = typer.Option(DEFAULT_VOCAB_SIZE, "--vocab-size", help="tokenizer vocabulary size"),
        seq_len: int | None = typer.Option(None, "--seq-len", help="context length (default: the preset's)"),
        as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    ) -> None:
        """Parameter count, config, FLOPs/token and parameter shapes of a preset (meta device)."""
        from pilot.errors import PilotError

        try:
            result = _model_info(preset, vocab_size, seq_len)
        except PilotError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise typer.Exit(code=2) from None
        if as_json:
            print(json.dumps(result))
        else:
            _print_text(result)

    app.add_typer(model_app, name="model")
