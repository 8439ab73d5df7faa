"""A tiny GPT: a decoder-only transformer in one readable file.

Pre-norm blocks, causal attention through ``F.scaled_dot_product_attention`` (the fused
kernel on every device), learned position embeddings and an output head tied to the token
embedding. The model does **not** shift labels: ``labels[:, t]`` is the target of position
``t``; the data pipeline (``course_lib.data``) does the shift, and ``-100`` marks positions
that are not scored (padding).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from course_lib.constants import IGNORE_INDEX

PRESETS: dict[str, dict[str, int]] = {
    # name: (layers, heads, width, context); sized for a 2-core CPU up to a single GPU
    "nano": dict(n_layer=2, n_head=2, n_embd=32, block_size=32),
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
}


@dataclass
class GPTConfig:
    """Shape of a :class:`GPT`.

    Attributes:
        vocab_size: number of token ids.
        block_size: longest sequence (context length) the model accepts.
        n_layer: number of transformer blocks.
        n_head: attention heads per block; must divide ``n_embd``.
        n_embd: model width.
        dropout: dropout probability on attention weights and residual branches.
        bias: whether linear and LayerNorm layers carry a bias.
        qk_norm: LayerNorm each head's queries and keys before the dot product (bounds the
            attention logits; OLMo 2, Gemma 3).
        z_loss: coefficient of the z-loss ``mean(logsumexp(logits)**2)`` added to the training
            loss (keeps the softmax normaliser near 1; PaLM uses 1e-4). 0 = off.
        logit_softcap: cap the output logits smoothly at +-cap with ``cap * tanh(logits / cap)``
            (Gemma 2 uses 30). ``None`` = off.
        mup_base_width: turn on muP (maximal update parametrisation) relative to a base model of
            this width: attention scores scaled by 1/head_dim (not 1/sqrt), output logits
            multiplied by ``base / n_embd``, hidden matrices initialised with variance
            proportional to 1/width. Pair it with ``course_lib.mup.mup_param_groups`` for the
            per-layer Adam learning rates. At ``n_embd == mup_base_width`` the model equals the
            standard one. ``None`` = standard parametrisation.
        tie_embeddings: share one matrix between the token embedding and the output head (GPT-2,
            and the default). ``False`` gives the head its own matrix: muP scales the two roles
            differently, and lesson 18 measures the learning-rate optimum moving with width
            under muP when they are tied. Pipeline stages need the tied model.
    """

    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    qk_norm: bool = False
    z_loss: float = 0.0
    logit_softcap: float | None = None
    mup_base_width: int | None = None
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            lower = self.n_embd // self.n_head * self.n_head
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: each head needs "
                f"an equal slice of the width. Use n_embd={lower or self.n_head} or "
                f"{lower + self.n_head}, or a head count that divides {self.n_embd}."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.z_loss < 0:
            raise ValueError(f"z_loss is a coefficient >= 0 (1e-4 is typical), got {self.z_loss}")
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            raise ValueError(f"logit_softcap must be positive (e.g. 30.0) or None, got {self.logit_softcap}")
        if self.mup_base_width is not None:
            base = self.mup_base_width
            if not isinstance(base, int) or base < self.n_head or base % self.n_head:
                raise ValueError(
                    f"mup_base_width={base!r} must be a positive width divisible by n_head={self.n_head} "
                    "(the width of the small model whose hyperparameters you tuned), or None"
                )

    @property
    def width_mult(self) -> float:
        """``n_embd / mup_base_width`` under muP, 1.0 otherwise."""
        return 1.0 if self.mup_base_width is None else self.n_embd / self.mup_base_width

    @classmethod
    def from_preset(cls, name: str, vocab_size: int, **overrides: Any) -> GPTConfig:
        """Build a config from a named size (``nano``, ``tiny``, ``small``, ``gpt2``)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(vocab_size=vocab_size, **{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (for JSON files and ``weights_only`` checkpoints)."""
        return asdict(self)


@dataclass
class GPTOutput:
    """What :meth:`GPT.forward` returns: ``logits`` (B, T, V) and ``loss`` (or ``None``)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


class LayerKVCache:
    """One layer's keys and values of the positions generated so far, (B, heads, length, hd).

    :meth:`GPT.generate` keeps one per block, so each new token computes its own key and value
    once and attends over the stored ones instead of recomputing the whole prefix.
    """

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """Number of positions stored."""
        return 0 if self.k is None else self.k.size(2)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' keys and values; return all keys and values so far."""
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v/o projections."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.head_dim = config.n_embd // config.n_head
        self.q_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.k_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.v_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.o_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        # One norm shared by all heads, so a tensor-parallel shard of the heads needs no change.
        self.q_norm = nn.LayerNorm(self.head_dim, bias=config.bias) if config.qk_norm else None
        self.k_norm = nn.LayerNorm(self.head_dim, bias=config.bias) if config.qk_norm else None
        # muP scales scores by 1/d (not 1/sqrt(d)); sqrt(d_base)/d equals SP's 1/sqrt(d) at the base width.
        self.scale = None
        if config.mup_base_width is not None:
            base_head_dim = config.mup_base_width // config.n_head
            self.scale = math.sqrt(base_head_dim) / self.head_dim

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, cache: LayerKVCache | None = None
    ) -> torch.Tensor:
        """Attend over ``x``; with a ``cache`` (generation, no padding mask) also over its positions."""
        B, T, _ = x.shape
        # (B, T, heads*hd) -> (B, heads, T, hd). The head count is read from the projection's
        # output, so a tensor-parallel shard holding a subset of heads runs this code unchanged.
        q, k, v = (
            proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(k, v)
            if past and T > 1:  # queries sit at positions past..past+T-1: a shifted causal mask
                attn_mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=attn_mask is None and past == 0,  # one new query sees every cached key
            scale=self.scale,
        )
        return self.resid_dropout(self.o_proj(y.transpose(1, 2).reshape(B, T, -1)))


class MLP(nn.Module):
    """Position-wise feed-forward network: width -> 4*width -> width with GELU."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.act = nn.GELU(approximate="tanh")
        self.fc_out = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc_out(self.act(self.fc_in(x))))


class Block(nn.Module):
    """One pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, cache: LayerKVCache | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A decoder-only transformer language model.

    ``model(input_ids, labels=None, attention_mask=None)`` returns a :class:`GPTOutput`.
    ``labels`` has the shape of ``input_ids``; ``labels[:, t]`` is the target for position
    ``t`` (already shifted by the data pipeline) and ``-100`` is ignored; the Hugging Face habit
    ``labels=input_ids`` (which here would train the identity map) is refused. ``attention_mask``
    (B, T) with 1 for real tokens and 0 for padding is optional: with right padding the causal
    mask alone already keeps padding out of every real position.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # weight tying: one matrix, used twice
        self.apply(self._init_weights)
        # GPT-2: scale the init of projections that write into the residual stream
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "fc_out.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.mup_base_width is not None:
            # muP: hidden matrices' variance shrinks as 1/width (embeddings keep theirs).
            shrink = 1.0 / math.sqrt(config.width_mult)
            for name, p in self.named_parameters():
                if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                                  "fc_in.weight", "fc_out.weight")):
                    p.data.mul_(shrink)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def embed(self, input_ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Token plus position embeddings (the first pipeline stage's work).

        ``start`` is the position of the first token (non-zero when a KV cache holds the prefix).
        """
        T = start + input_ids.size(1)
        if T > self.config.block_size:
            raise ValueError(
                f"sequence length {T} exceeds block_size={self.config.block_size}; "
                "truncate the input or build the model with a larger block_size"
            )
        pos = torch.arange(start, T, device=input_ids.device)
        return self.drop(self.wte(input_ids) + self.wpe(pos))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm and tied output projection (the last pipeline stage's work).

        Under muP the logits are multiplied by ``1 / width_mult``; with ``logit_softcap`` they
        are squashed into (-cap, cap).
        """
        logits = self.lm_head(self.ln_f(x))
        if self.config.mup_base_width is not None:
            logits = logits / self.config.width_mult
        cap = self.config.logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> GPTOutput:
        """Run the model; ``reduction="sum"`` returns the summed token loss (for accumulation)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        if labels is not None and _same_memory(labels, input_ids):
            raise ValueError(
                "labels is input_ids: this model does not shift (labels[:, t] is the target of position t), so "
                "this trains it to copy its input. Pass the next tokens as labels: labels = input_ids[:, 1:] with "
                "input_ids[:, :-1] as the input, or the 'labels' of a course_lib.data batch"
            )
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} must equal input_ids shape "
                f"{tuple(input_ids.shape)} (labels[:, t] is the target of position t)"
            )
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
                f"{tuple(input_ids.shape)} (1 on real tokens, 0 on padding)"
            )
        mask = None if attention_mask is None else padding_attention_mask(attention_mask)
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, mask)
        logits = self.head(x)
        loss = None if labels is None else lm_loss(logits, labels, reduction, z_loss=self.config.z_loss)
        return GPTOutput(logits=logits, loss=loss)

    def num_params(self, non_embedding: bool = False) -> int:
        """Number of distinct parameters (the tied head is counted once).

        With ``non_embedding=True`` the token and position embeddings are left out, as in
        the scaling-law papers.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel() + self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: ``6 * N + 12 * n_layer * n_embd * seq_len``.

        ``6 N`` counts the forward (2 N) and backward (4 N) matrix multiplies over the weights
        (N without position embeddings, which are a lookup; the tied head is a real matmul);
        the second term is attention's score and value products (PaLM, appendix B).
        """
        c = self.config
        T = c.block_size if seq_len is None else seq_len
        n = self.num_params() - self.wpe.weight.numel()
        return 6 * n + 12 * c.n_layer * c.n_embd * T

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens; ``temperature=0`` means greedy decoding.

        With ``use_cache`` (the default) each block keeps the keys and values of the positions
        seen (:class:`LayerKVCache`), so a new token costs one position's forward pass, and the
        head runs on the last position only. ``use_cache=False`` recomputes the whole context for
        every token (the reference the tests compare against). Both see at most the last
        ``block_size`` tokens: once the sequence is longer the window slides, every position
        shifts (learned position embeddings) and no cached key stays valid, so the cache is
        rebuilt from the window at each step -- the same outputs, at the uncached speed.
        """
        bs = self.config.block_size
        caches: list[LayerKVCache] = []
        for _ in range(max_new_tokens):
            n = input_ids.size(1)
            if not use_cache:
                logits = self(input_ids[:, -bs:]).logits[:, -1, :]
            else:
                if caches and caches[0].length == n - 1 and n <= bs:
                    new = input_ids[:, -1:]  # the cache holds every earlier position
                else:  # first step, or the window slid: (re)build the cache from the window
                    caches, new = [LayerKVCache() for _ in self.blocks], input_ids[:, -bs:]
                x = self.embed(new, start=caches[0].length)
                for block, cache in zip(self.blocks, caches, strict=True):
                    x = block(x, None, cache)
                logits = self.head(x[:, -1, :])
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, 1, generator=generator)
            input_ids = torch.cat([input_ids, next_id], dim=1)
        return input_ids


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` is ``b``, or a view of exactly the same elements (the Hugging Face habit ``labels=input_ids``)."""
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
                      and a.device == b.device and a.numel() > 0)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean", z_loss: float = 0.0) -> torch.Tensor:
    """Cross-entropy over positions whose label is not -100, plus an optional z-loss.

    ``F.cross_entropy`` wants classes in dimension 1, so (B, T, V) logits are flattened to
    (B*T, V) first; passing them unflattened is a classic bug (it treats T as the class axis).
    With ``z_loss > 0`` each scored position adds ``z_loss * logsumexp(logits)**2`` (same
    reduction), which pulls the softmax normaliser towards 1 and the logits away from drift.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    flat_logits = logits.reshape(-1, logits.size(-1))
    if flat_logits.dtype in (torch.float16, torch.bfloat16):
        flat_logits = flat_logits.float()  # low-precision logits: the softmax in float32 (float64 stays float64)
    flat_labels = labels.reshape(-1)
    loss = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction=reduction)
    if z_loss:
        scored = flat_labels != IGNORE_INDEX
        z = flat_logits[scored].logsumexp(dim=-1).square().sum()
        if reduction == "mean":
            z = z / scored.sum().clamp(min=1)
        loss = loss + z_loss * z
    return loss


def padding_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Turn a (B, T) 1/0 padding mask into a (B, 1, T, T) boolean causal mask for SDPA.

    Each position always sees itself, so a padding query never has an empty row (which would
    give NaN); real positions see only real, earlier keys.
    """
    B, T = attention_mask.shape
    keys = attention_mask.bool()[:, None, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=attention_mask.device)
    return (causal & keys) | eye


def closed_form_num_params(config: GPTConfig) -> int:
    """Parameter count of :class:`GPT` from its config alone (a tied head counted once)."""
    d, L, V, T = config.n_embd, config.n_layer, config.vocab_size, config.block_size
    b = 1 if config.bias else 0
    ln = 2 * d if config.bias else d
    head_dim = d // config.n_head
    qk_norms = 2 * (2 * head_dim if config.bias else head_dim) if config.qk_norm else 0
    attn = 4 * (d * d + b * d) + qk_norms
    mlp = d * 4 * d + b * 4 * d + 4 * d * d + b * d
    head = 0 if config.tie_embeddings else V * d
    return V * d + head + T * d + L * (2 * ln + attn + mlp) + ln
