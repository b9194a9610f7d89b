"""Node names people recognize: dynamo's flattened names as module paths, and wrapped lines.

The passes' messages and graph dumps, and the tools' diffs and pictures, all name nodes
through this module. Standard library and torch.fx only; nothing here imports the rest of
the package.

- :func:`readable_name` renames dynamo's flattened placeholders
  (``L_args_0_modules_model_modules_layers_modules_0_modules_self_attn_modules_q_proj_parameters_weight_``)
  to module paths (``model.layers.0.self_attn.q_proj.weight``).
- :func:`readable_code` does it for a whole graph's code and wraps long lines. The result is
  for reading, not for ``exec`` (dotted names are not identifiers).
- :func:`stack_path` is the module path dynamo recorded for a node.
"""

from __future__ import annotations

import re
from typing import Optional

import torch.fx as fx

WIDTH = 100  # text form: no line wider than this
_FLAT = re.compile(
    r"\b[Ll]_(?:self|args_\d+|kwargs)_\w*?_\b|\b[Ll]_\w+_(?:parameters|buffers)_\w+?_\b"
)


def readable_name(name: str) -> str:
    """Dynamo's flattened placeholder name -> module path; other names unchanged.

    ``L_args_0_modules_model_modules_layers_modules_0_modules_self_attn_modules_q_proj_parameters_weight_``
    (and its lower-case ``l_...`` twin in the body) -> ``model.layers.0.self_attn.q_proj.weight``;
    ``L_kwargs_input_ids_`` -> ``input_ids``; ``L_self_modules_model_...`` likewise."""
    m = re.fullmatch(r"[Ll]_(?:self_|args_\d+_|kwargs_)?(\w+?)_", name)
    if not m:
        return name
    body = m.group(1)
    if not re.search(r"(?:^|_)(?:modules|parameters|buffers)_", body):
        return body if re.match(r"[Ll]_kwargs_", name) else name
    body = re.sub(r"^(?:modules|parameters|buffers)_", "", body)
    return re.sub(r"_(?:modules|parameters|buffers)_", ".", body)


def readable_code(code: str, width: Optional[int] = WIDTH) -> str:
    """``code`` with flattened names as module paths and, with ``width``, lines wrapped.
    Dynamo's ``l_x_ = L_x_`` rebindings, which read ``x = x`` once renamed, are dropped;
    source comments name files below ``site-packages`` (``transformers/models/...``)."""
    renamed = _SITE_PACKAGES.sub(r"\1", _FLAT.sub(lambda m: readable_name(m.group(0)), code))
    lines = [line for line in renamed.splitlines() if not _SELF_ASSIGN.fullmatch(line)]
    if width is None:
        return "\n".join(lines)
    return "\n".join(part for line in lines for part in wrap(line, width))


_SELF_ASSIGN = re.compile(r"\s*([\w.]+) = \1")
_SITE_PACKAGES = re.compile(
    r"(# File: )\S*?[/\\](?:site|dist)-packages[/\\]"
)  # print_readable's source paths


def wrap(line: str, width: int = WIDTH) -> list[str]:
    """Break ``line`` after commas (else spaces), outside string literals where it can, so
    that no piece is wider than ``width``; continuation lines are indented 4 past the line's
    own indent (a comment's continue as comments). A single token wider than the width is cut."""
    if len(line) <= width:
        return [line]
    lead = len(line) - len(line.lstrip())
    comment = line.lstrip().startswith("#")
    indent = " " * lead + ("#   " if comment else "    ")
    pieces, rest = [], line
    while len(rest) > width:
        cut = _cut(rest, len(indent) + 1, width, comment)
        pieces.append(rest[:cut].rstrip())
        rest = indent + rest[cut:].lstrip()
    pieces.append(rest)
    return pieces


def _cut(text: str, lo: int, width: int, comment: bool) -> int:
    """Where to break ``text``: after the last ", " (else " ") in ``[lo, width)`` outside a
    string literal, else after any space there, else at ``width``."""
    quoted, quote = [], None
    for ch in text[:width]:
        quoted.append(quote is not None)
        if not comment and ch in "'\"":
            quote = None if quote == ch else (ch if quote is None else quote)
    for sep in (", ", " "):
        i = text.rfind(sep, lo, width - len(sep) + 1)
        while i > 0 and quoted[i]:
            i = text.rfind(sep, lo, i)
        if i > 0:
            return i + len(sep)
    i = text.rfind(" ", lo, width)
    return i + 1 if i > 0 else width


def stack_path(node: fx.Node) -> Optional[str]:
    """The innermost module dynamo recorded for ``node``, as its source path without the model
    argument (``L['self'].model.layers[0].self_attn`` -> ``model.layers[0].self_attn``); None
    when the node has no module stack."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    return re.sub(r"^L\['\w+'\](\[\d+\])?\.?", "", str(list(stack.values())[-1][0]))


__all__ = ["WIDTH", "readable_code", "readable_name", "stack_path", "wrap"]
