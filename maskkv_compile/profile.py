"""Offline layer-importance profile for MaskKV's boundary-aware layer budgets (maskkv.md §4).

``I_l = 1 - mean_i cos(h_in[i], h_out[i])``, with ``h_in`` / ``h_out`` the residual stream before
and after layer ``l``'s attention sub-layer, measured once on calibration prompts and stored as
versioned JSON together with a fingerprint of the model it was measured on.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

PROFILE_FORMAT = "maskkv-layer-profile"
PROFILE_VERSION = 2  # 2: optional attention-coverage curves (``coverage``, ``coverage_k``)

# fingerprint key -> config attribute names tried in order (HF names first, then LLaDA's own)
_CONFIG_NAMES = {
    "n_layers": ("num_hidden_layers", "n_layers", "num_layers"),
    "n_heads": ("num_attention_heads", "n_heads"),
    "n_kv_heads": ("num_key_value_heads", "n_kv_heads"),
    "hidden_size": ("hidden_size", "d_model"),
}


class ProfileMismatchError(ValueError):
    """A layer profile measured on a different model than the one it is applied to."""


def attention_importance(h_in: Tensor, h_out: Tensor, mask: Optional[Tensor] = None) -> float:
    """``1 - mean_i cos(h_in[i], h_out[i])`` over tokens ``i`` (all leading dims are tokens).

    ``h_in`` / ``h_out``: ``(..., T, D)`` residual stream before / after the attention sub-layer;
    ``mask`` (``(..., T)`` bool, optional) selects the tokens that count (e.g. not padding).
    Computed in float32; in ``[0, 2]``, larger = the layer changes its input more.
    """
    if h_in.shape != h_out.shape:
        raise ValueError(
            f"h_in and h_out shapes differ: {tuple(h_in.shape)} vs {tuple(h_out.shape)}"
        )
    cos = F.cosine_similarity(h_in.float(), h_out.float(), dim=-1, eps=1e-8)
    if mask is not None:
        cos = cos[mask.to(torch.bool).expand_as(cos)]
    if cos.numel() == 0:
        raise ValueError("attention_importance needs at least one token")
    return float(1.0 - cos.mean())


def _read(config: Any, names: Sequence[str]) -> Optional[int]:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


def model_fingerprint(obj: Any, model_class: Optional[str] = None) -> dict:
    """``{model_class, n_layers, n_heads, n_kv_heads, hidden_size}`` of a model or config-like
    object.

    Reads ``num_hidden_layers`` / ``num_attention_heads`` / ``num_key_value_heads`` (default: the
    number of heads) / ``hidden_size`` (or LLaDA's ``n_layers`` / ``n_heads`` / ``n_kv_heads`` /
    ``d_model``) from ``obj``, or from ``obj.config`` when ``obj`` is a model; a multimodal config's
    ``get_text_config()`` is used when the names are not at the top. ``model_class``: the given
    name, else the config's ``architectures[0]``, else the type name of the model (or config).
    """
    config = (
        obj if _read(obj, _CONFIG_NAMES["n_layers"]) is not None else getattr(obj, "config", obj)
    )
    if _read(config, _CONFIG_NAMES["n_layers"]) is None and callable(
        getattr(config, "get_text_config", None)
    ):
        config = config.get_text_config()
    values = {key: _read(config, names) for key, names in _CONFIG_NAMES.items()}
    if values["n_kv_heads"] is None:
        values["n_kv_heads"] = values["n_heads"]
    missing = [
        f"{key} (tried {', '.join(_CONFIG_NAMES[key])})" for key, v in values.items() if v is None
    ]
    if missing:
        raise ValueError(f"cannot fingerprint {type(obj).__name__}: missing {'; '.join(missing)}")
    if model_class is None:
        architectures = getattr(config, "architectures", None) or []
        model_class = architectures[0] if architectures else type(obj).__name__
    return {"model_class": str(model_class), **values}


def _describe(fp: Mapping[str, Any]) -> str:
    rest = ", ".join(f"{k}={v}" for k, v in fp.items() if k != "model_class")
    return f"{fp.get('model_class', '?')} ({rest})"


@dataclass(frozen=True)
class LayerProfile:
    """Per-layer importance ``I_l`` of one model, with that model's fingerprint.

    importance: one value per layer (``len == fingerprint["n_layers"]`` when present).
    fingerprint: :func:`model_fingerprint` of the calibrated model.
    version: file-format version (this code reads up to :data:`PROFILE_VERSION`).
    meta: calibration info, JSON-serializable (e.g. ``n_prompts``, ``gen_length``).
    coverage: optional, one curve per layer: ``coverage[l][i]`` is the share of the mask
        queries' whole attention that the top ``coverage_k[i]`` prompt entries of each KV
        head hold (by those queries' own votes), averaged over heads and prompts; in [0, 1],
        non-decreasing in ``k``. What ``MaskKV(layers="coverage")`` allocates by.
    coverage_k: the entry counts of the curves, strictly increasing from 0.
    """

    importance: tuple[float, ...]
    fingerprint: dict
    version: int = PROFILE_VERSION
    meta: dict = field(default_factory=dict)
    coverage: Optional[tuple[tuple[float, ...], ...]] = None
    coverage_k: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:
        importance = tuple(float(v) for v in self.importance)
        if not importance or not all(math.isfinite(v) for v in importance):
            raise ValueError(
                "importance must be a non-empty sequence of finite numbers, "
                f"got {self.importance!r}"
            )
        object.__setattr__(self, "importance", importance)
        object.__setattr__(self, "fingerprint", dict(self.fingerprint))
        object.__setattr__(self, "meta", dict(self.meta))
        self._check_coverage(len(importance))
        n_layers = self.fingerprint.get("n_layers")
        if n_layers is not None and n_layers != len(importance):
            raise ValueError(
                f"importance has {len(importance)} values but the fingerprint "
                f"says {n_layers} layers"
            )
        if (
            isinstance(self.version, bool)
            or not isinstance(self.version, int)
            or not 1 <= self.version <= PROFILE_VERSION
        ):
            raise ValueError(
                f"profile version {self.version!r} is not supported; this maskkv_compile reads "
                f"versions 1..{PROFILE_VERSION} (a newer one needs a newer maskkv_compile)"
            )

    def _check_coverage(self, n_layers: int) -> None:
        if (self.coverage is None) != (self.coverage_k is None):
            raise ValueError("coverage and coverage_k go together: give both or neither")
        if self.coverage is None:
            return
        ks = tuple(int(k) for k in self.coverage_k)
        if not ks or ks[0] != 0 or any(b <= a for a, b in zip(ks, ks[1:])):
            raise ValueError(f"coverage_k must increase strictly from 0, got {ks}")
        curves = tuple(tuple(float(v) for v in curve) for curve in self.coverage)
        if len(curves) != n_layers or any(len(c) != len(ks) for c in curves):
            raise ValueError(
                f"coverage must hold {n_layers} curves (one per layer) of {len(ks)} values "
                f"(one per coverage_k), got {[len(c) for c in curves]}"
            )
        for layer, curve in enumerate(curves):
            if not all(math.isfinite(v) and -1e-6 <= v <= 1 + 1e-6 for v in curve) or any(
                b < a - 1e-9 for a, b in zip(curve, curve[1:])
            ):
                raise ValueError(
                    f"coverage curve of layer {layer} must be non-decreasing values in [0, 1]"
                )
        object.__setattr__(self, "coverage", curves)
        object.__setattr__(self, "coverage_k", ks)

    @property
    def has_coverage(self) -> bool:
        return self.coverage is not None

    @classmethod
    def from_measurements(
        cls,
        per_prompt: Sequence[Sequence[float]],
        fingerprint: Mapping[str, Any],
        coverage: Optional[Sequence[Tensor]] = None,
        coverage_k: Optional[Sequence[int]] = None,
        **meta: Any,
    ) -> "LayerProfile":
        """Average per-prompt importance lists (one value per layer each) into a profile;
        ``coverage``: per-prompt (layers, len(coverage_k)) curves, averaged too; ``meta`` gets
        ``n_prompts`` plus whatever is passed (e.g. ``gen_length``)."""
        rows = torch.tensor([list(map(float, r)) for r in per_prompt], dtype=torch.float64)
        if rows.dim() != 2 or rows.shape[0] == 0:
            raise ValueError(
                "need at least one prompt's per-layer importance, all of the same length"
            )
        curves = None
        if coverage:
            curves = tuple(map(tuple, torch.stack([c.double() for c in coverage]).mean(0).tolist()))
        return cls(
            tuple(rows.mean(0).tolist()),
            dict(fingerprint),
            meta={"n_prompts": rows.shape[0], **meta},
            coverage=curves,
            coverage_k=None if curves is None else tuple(coverage_k),
        )

    @property
    def n_layers(self) -> int:
        return len(self.importance)

    def to_dict(self) -> dict:
        out = {
            "format": PROFILE_FORMAT,
            "version": self.version,
            "importance": list(self.importance),
            "fingerprint": self.fingerprint,
            "meta": self.meta,
        }
        if self.coverage is not None:
            out["coverage"] = [[round(v, 6) for v in curve] for curve in self.coverage]
            out["coverage_k"] = list(self.coverage_k)
        return out

    def save(self, path: Union[str, Path]) -> Path:
        """Write the profile as JSON; returns the path."""
        try:
            text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        except TypeError as exc:
            raise ValueError(f"profile fingerprint/meta must be JSON-serializable: {exc}") from None
        path = Path(path)
        path.write_text(text + "\n")
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "LayerProfile":
        """Read a profile written by :meth:`save`; refuses other files and newer versions."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            raise ValueError(
                f"{path} is not a MaskKV layer profile (expected format {PROFILE_FORMAT!r})"
            )
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LayerProfile":
        """The profile :meth:`to_dict` wrote (as saved inside a quality JSON too)."""
        return cls(
            tuple(data["importance"]),
            data["fingerprint"],
            version=data["version"],
            meta=data.get("meta", {}),
            coverage=data.get("coverage"),
            coverage_k=data.get("coverage_k"),
        )

    def check_compatible(self, fingerprint: Union[Mapping[str, Any], Any]) -> None:
        """Raise :class:`ProfileMismatchError` naming both models unless ``fingerprint`` (a dict,
        or a model / config, fingerprinted with :func:`model_fingerprint`) matches this
        profile's."""
        other = (
            dict(fingerprint)
            if isinstance(fingerprint, Mapping)
            else model_fingerprint(fingerprint)
        )
        diffs = [
            f"{k}: {self.fingerprint.get(k)!r} vs {other.get(k)!r}"
            for k in sorted(set(self.fingerprint) | set(other))
            if self.fingerprint.get(k) != other.get(k)
        ]
        if diffs:
            raise ProfileMismatchError(
                f"layer profile was measured on {_describe(self.fingerprint)} but the "
                f"model is {_describe(other)} (differs in {'; '.join(diffs)}); measure a "
                "profile for this model"
            )
