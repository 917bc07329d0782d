"""The architecture variants a model config may choose, and the check of a choice."""

from __future__ import annotations

from transformer_mt.errors import ConfigError

# config key -> its allowed values, the default (the paper's model) first
VARIANTS: dict[str, tuple[str, ...]] = {
    "positions": ("sinusoidal", "learned", "rope"),
    "norm": ("layernorm", "rmsnorm"),
    "activation": ("relu", "gelu", "swiglu"),
}


def check_variant(key: str, value: object) -> None:
    """Raise a ConfigError naming ``model.<key>`` and its allowed values unless ``value``
    is one of them."""
    allowed = VARIANTS[key]
    if value not in allowed:
        raise ConfigError(f"model.{key}={value!r} is not one of: {', '.join(allowed)}")


def check_rope_head_size(d_model: int, n_heads: int) -> None:
    """RoPE rotates pairs of dimensions: ``model.positions=rope`` needs an even head size
    d_model / n_heads (a d_model that n_heads does not divide is reported elsewhere)."""
    if d_model % n_heads == 0 and (d_model // n_heads) % 2:
        raise ConfigError(
            f"model.positions=rope needs an even head size; model.d_model={d_model} / "
            f"model.n_heads={n_heads} = {d_model // n_heads}"
        )
