"""Parameter counts of a transformer from its config.json alone (no weights needed).

Counts follow the module layout of HF decoder models (Llama, Mistral, Qwen2, Gemma, ...) and of
BERT-style encoders (reward backbones such as MiniLM). Checked against published sizes in
tests/placement/test_shapes.py: Llama-3.1-8B 8.03B, Llama-3.1-70B 70.6B, Llama-2-7B 6.74B.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# config.json of the hub models the shipped GPU configs name (source and rules: known_models/README.md).
KNOWN_MODELS = Path(__file__).with_name("known_models")
# Decoders whose MLP is gated (gate, up, down: 3 matrices); BERT-style encoders have 2 and biases.
ENCODER_TYPES = frozenset({"bert", "roberta", "distilbert", "xlm-roberta", "electra", "deberta-v2"})


def known_config(hub_id: str) -> Optional[dict]:
    """The shipped config.json of hub id `org/name`, or None when the package does not carry it."""
    path = KNOWN_MODELS / (hub_id.replace("/", "--") + ".json")
    return json.loads(path.read_text()) if path.is_file() else None


class ShapeError(ValueError):
    """config.json lacks a field that the parameter count needs."""


@dataclass(frozen=True)
class ModelShape:
    hidden: int                # H
    intermediate: int          # I (MLP width)
    layers: int                # L
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int                 # V
    tied: bool                 # lm_head shares the embedding matrix
    encoder: bool = False      # BERT-style: 2-matrix MLP with biases, no lm_head
    name: str = ""

    @classmethod
    def from_config(cls, cfg: dict, name: str = "") -> "ModelShape":
        def need(key: str):
            if key not in cfg:
                raise ShapeError(f"{name or 'config.json'}: no {key!r}; the memory plan needs it to count parameters")
            return int(cfg[key])
        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        return cls(hidden=hidden, intermediate=need("intermediate_size"), layers=need("num_hidden_layers"),
                   heads=heads, kv_heads=int(cfg.get("num_key_value_heads") or heads),
                   head_dim=int(cfg.get("head_dim") or hidden // heads), vocab=need("vocab_size"),
                   tied=bool(cfg.get("tie_word_embeddings", False)),
                   encoder=cfg.get("model_type") in ENCODER_TYPES, name=name)

    # -- counts -----------------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection in one layer, by its HF module name (the names LoRA targets)."""
        h, i = self.hidden, self.intermediate
        attn = {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h)}
        if self.encoder:
            return {**attn, "up_proj": (h, i), "down_proj": (i, h)}
        return {**attn, "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values())

    def layer_params(self) -> int:
        """One block: projections, norms (2 x H), and for encoders biases and LayerNorm shifts."""
        extra = 2 * self.hidden
        if self.encoder:  # biases of every projection + LayerNorm biases
            extra += sum(b for _, b in self.linear_shapes().values()) + 2 * self.hidden
        return self.layer_linear_params() + extra

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        """lm_head (0 when tied or for an encoder)."""
        return 0 if (self.tied or self.encoder) else self.vocab * self.hidden

    def params(self, head: str = "lm") -> int:
        """All parameters. head: "lm" (causal LM), "value" or "score" (one scalar per token: critic and
        reward model replace lm_head by an H -> 1 projection)."""
        body = self.embed_params + self.layers * self.layer_params() + self.hidden  # + final norm
        return body + (self.head_params if head == "lm" else self.hidden)

    def linear_params(self) -> int:
        """Parameters in the layers' projections: what 4-bit quantization and fp8 replace."""
        return self.layers * self.layer_linear_params()

    def lora_params(self, r: int, targets: tuple[str, ...]) -> int:
        """A (r x in) + B (out x r) for every targeted projection of every layer."""
        shapes = self.linear_shapes()
        unknown = [t for t in targets if t not in shapes]
        if unknown:
            raise ShapeError(f"model.lora.target_modules {unknown} are not projections of {self.name or 'this model'} "
                             f"(it has {sorted(shapes)})")
        return self.layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)

    def kv_bytes_per_token(self, dtype_bytes: float, tp: int = 1) -> float:
        """K and V of every layer for one token on one of `tp` tensor-parallel GPUs (KV heads are split
        over TP ranks, replicated when there are fewer KV heads than ranks)."""
        kv_heads = max(self.kv_heads / tp, 1.0)
        return 2 * self.layers * kv_heads * self.head_dim * dtype_bytes
