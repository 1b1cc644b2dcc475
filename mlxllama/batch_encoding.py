"""Token id lists shaped as transformers' tokenizers return them: truncated, padded, with an
attention mask (and an assistant mask), as lists or (B, L) tensors of NumPy, MLX or PyTorch."""

from __future__ import annotations

from typing import Any

from .errors import InputError


def span_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose characters overlap one of the (sorted) spans, as transformers marks them."""
    mask = [0] * len(offsets)
    k = 0
    for i, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0]:
            mask[i] = 1
    return mask


def as_tensor(rows: list[list[int]], kind: str) -> Any:
    """A (B, L) array of the framework `kind` names: "np", "mlx" or "pt"."""
    import numpy as np

    array = np.array(rows, dtype=np.int64)
    if kind == "np":
        return array
    if kind == "mlx":
        import mlx.core as mx

        return mx.array(array.astype(np.int32))
    if kind == "pt":
        try:
            import torch
        except ImportError:
            raise InputError("return_tensors='pt' needs PyTorch, which is not installed") from None
        return torch.from_numpy(array)
    raise InputError(f"return_tensors must be 'np', 'mlx' or 'pt', got {kind!r}")


def shape_batch(ids: list[list[int]], assistant: list[list[int]] | None = None, *, pad_id: int | None,
                padding: bool | str = False, truncation: bool = False, max_length: int | None = None,
                return_tensors: str | None = None, batched: bool = True, padding_side: str = "right",
                truncation_side: str = "right") -> dict[str, Any]:
    """{"input_ids", "attention_mask"[, "assistant_masks"]}; one row's lists when not `batched`
    and no tensors are asked for (tensors are always (B, L))."""
    if truncation and max_length is not None:
        def cut(row: list[int]) -> list[int]:
            return row[-max_length:] if truncation_side == "left" else row[:max_length]

        ids = [cut(row) for row in ids]
        assistant = [cut(row) for row in assistant] if assistant is not None else None
    masks = [[1] * len(row) for row in ids]
    if padding not in (False, None, "do_not_pad"):
        if padding not in (True, "longest", "max_length"):
            raise InputError(f"padding must be True, 'longest', 'max_length' or False, got {padding!r}")
        if pad_id is None:
            raise InputError("cannot pad: the tokenizer has no padding token")
        width = max_length if padding == "max_length" and max_length else max(map(len, ids))
        pads = [width - len(row) for row in ids]

        def pad(rows: list[list[int]], value: int) -> list[list[int]]:
            if padding_side == "left":
                return [[value] * n + row for n, row in zip(pads, rows)]
            return [row + [value] * n for n, row in zip(pads, rows)]

        ids, masks = pad(ids, pad_id), pad(masks, 0)
        assistant = pad(assistant, 0) if assistant is not None else None
    out = {"input_ids": ids, "attention_mask": masks}
    if assistant is not None:
        out["assistant_masks"] = assistant
    if return_tensors is None:
        return out if batched else {k: v[0] for k, v in out.items()}
    if len({len(row) for row in ids}) > 1:
        raise InputError("cannot make one tensor of conversations of different lengths: pass padding=True")
    return {k: as_tensor(v, return_tensors) for k, v in out.items()}
