"""The unified ranker: an ID transformer, the PPM modality transformer and MMoE task heads.

After PPM (Gao et al., "A Pre-trained Plug-in Model for CTR Prediction", arXiv 2403.10049):
the ID module (IDRec) learns from hashed ids and knows nothing about an item nobody has
interacted with yet; the PPM module sees the same behaviour sequence through the items'
cached modal vectors (text 384 + image 1280 = 1664 floats from frozen encoders, computed once
when an item arrives), so a brand-new item is scored by what it looks like. Both feed a
multi-gate mixture of experts with one tower per task (click, order, collect).

Variants (``RankerConfig.variant``):

* ``"idrec"``: ID module only; modal inputs are never read (they may be absent).
* ``"ppm"``: ID module + PPM module, trained end to end (the unified model).
* ``"modal"``: PPM module only; id inputs (item, category, brand, shop, price, sequence ids)
  are never read. Its ``ppm.*`` weights load into a ``"ppm"`` model (same names), which is
  the paper's "pre-train, then plug in" step.

The batch contract — a dict of tensors on the model's device, built alike for training and
serving by ``trainer.features``. B = batch size, L = sequence length (L <= ``max_seq_len``),
M = rows of the modal table::

    item_id, category, brand, shop   int64 (B,)    target item's ids, hashed by the data layer
                                                   into [1, <x>_buckets); 0 = unknown (for
                                                   item ids: not in the model's
                                                   item_vocabulary)
    price_bucket                     int64 (B,)    in [0, price_buckets)
    item_rates                       float (B, 2)  the target item's click history in the
                                                   model's training data: smoothed rate
                                                   lift and log1p(impressions)
                                                   (trainer.features.id_rates); read only
                                                   with config.id_rates
    taste_rates                      float (B, 4)  the user's click history on items of the
                                                   target's category, brand, shop and price
                                                   bucket: smoothed rate lifts
                                                   (trainer.features.taste_features); read
                                                   only with config.taste_rates
    user_id                          int64 (B,)    the user's id, hashed like item_id into
                                                   [1, user_buckets); 0 = unknown (not in
                                                   the model's user_vocabulary); (1,) when
                                                   one sequence is shared (below)
    user_rates                       float (B, 2)  the same of the user; (1, 2) when shared
    seq_item_id                      int64 (B, L)  hashed like item_id; 0 = padding or
                                                   unknown
    seq_action                       int64 (B, L)  0 padding, 1 click, 2 order, 3 collect,
                                                   4 impression (only with
                                                   sequence_impressions;
                                                   trainer.features.SEQUENCE_CODES)
    seq_gap                          int64 (B, L)  recency bucket of the interaction at the
                                                   impression (trainer.features.gap_bucket);
                                                   0 = padding
    seq_mask                         bool  (B, L)  True where a real position is (an
                                                   interaction or an impression)
                                                   (the four seq_* tensors may instead have
                                                   one row, (1, L): one sequence shared by
                                                   every candidate, as in serving)
    modal_table                      float (M, modal_dim)  cached item vectors; row 0 ignored
    target_modal_row                 int64 (B,)    row of the target in modal_table;
                                                   0 = missing/stale -> learned vector
    seq_modal_row                    int64 (B, L)  rows of the sequence items; 0 = missing
                                                   (or (1, L), shared, like seq_*)
    labels                           float32 (B, n_tasks)  optional; order of config.tasks
    label_mask                       bool  (B, n_tasks)    optional; False = label absent

Sequences are LEFT-padded: the last position is the most recent interaction, and positions
are counted from there, so extra left padding never changes a score. ``forward(batch)``
returns ``(logits (B, n_tasks), loss)``; ``loss`` is None without ``labels``. Absent labels
(``label_mask`` False, any value, even NaN) are left out of the loss, not read as negatives.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.features import IMPRESSION_CODE, N_ACTIONS, TASKS, IdVocabulary

VARIANTS = ("idrec", "ppm", "modal")


@dataclass
class RankerConfig:
    variant: str = "ppm"  # "idrec" (IDs only), "ppm" (IDs + modal, unified), "modal" (modal only)
    tasks: tuple[str, ...] = TASKS  # one tower and label column each (a subset of TASKS)
    task_weights: tuple[float, ...] = (1.0, 0.5, 0.5)  # loss weight per task, aligned w/ tasks
    # hash buckets: sizes of the id tables (the data layer hashes into [1, buckets); 0 unknown)
    item_buckets: int = 2**16  # 65k item rows x d_model: the bulk of the parameters; dense
    # AdamW touches every row each step, so more rows cost time even when unused
    category_buckets: int = 2**10  # categories are few; collisions are rare at 1k
    brand_buckets: int = 2**12  # 4k brands
    shop_buckets: int = 2**12  # 4k shops
    user_buckets: int = 2**14  # 16k user rows x side_dim; 0: no user id feature
    id_rates: bool = True  # read the user's and the target item's smoothed click rates and
    #   impression counts in the training data (item_rates, user_rates): how often this user
    #   clicks at all and how popular the item is, which behaviour sequences (positive
    #   actions only) cannot say
    taste_rates: bool = True  # with id_rates: also read the user's click rates on the
    #   target's category, brand, shop and price bucket (taste_rates): the user's taste,
    #   counted over impressions, passed-over ones included
    wide_rates: bool = True  # with id_rates: add a linear term of those rates to every
    #   task's logit (Wide & Deep's wide part), initialised as item lift + user lift
    #   (weights 1), which trainer.train.start_wide_part replaces by a regression on the
    #   training data where trainer.wide_start is 'fitted' (a model fitted from scratch); a model
    #   that reads no rates (no id_rates, or the modal variant) has none, whatever this says
    content_affinity: bool = False  # the PPM module also reads the cosines of the target's
    #   cached vector with the mean of the sequence's interactions' and of its impressions'
    #   (content_cosines): what the user took and what the user was shown; the wide part
    #   reads them too. Variants without vectors read none, whatever this says
    price_buckets: int = 32  # price_bucket values are already in [0, 32)
    gap_buckets: int = 16  # recency buckets: 0 padding, 1..15 log-spaced from <1 min to >30 d
    max_seq_len: int = 50  # longest behaviour sequence L the position table covers
    sequence_impressions: int = 0  # of those L, at most this many impressions (items
    #   shown, clicked or not), the rest interactions; 0: interactions only
    #   (features.sequence_impressions; the rule: trainer.features.sequence_features)
    modal_dim: int = 1664  # width of a cached item vector: text 384 + image 1280
    # transformers (the ID and the PPM module each have their own)
    d_model: int = 64  # token width; small, because training runs on a few CPU cores
    n_heads: int = 2  # attention heads (d_model must divide by it)
    n_layers: int = 2  # encoder layers per transformer
    d_ff: int = 128  # feed-forward width inside each encoder layer
    attention: str = "target"  # "target": sequence tokens attend to each other, the target
    #   to all, so the sequence is encoded once per request and shared by every candidate
    #   (far cheaper to serve: bench/serve.py, docs/results.md); "full": every token attends
    #   to every token, the sequence too sees the target (one full pass per candidate)
    side_dim: int = 16  # width of each side feature (category, brand, shop, price, user)
    dropout: float = 0.3  # in the experts and towers, on (B, expert_dim) activations: cheap
    id_dropout: float = 0.0  # training only: share of samples whose target item id is
    #   replaced by "unknown" (bucket 0, a zero vector), so the model learns to score an item
    #   whose id embedding taught it nothing yet, which is every new item (DropoutNet-style)
    modal_dropout: float = 0.0  # training only: dropout on the cached vectors (M, modal_dim)
    #   before the PPM module projects them. A vector is a fingerprint of its item, so
    #   without noise the projection can learn a training item's own effect from it, which
    #   a new item's vector does not carry (the shuffled-vector control shows that cost)
    seq_dropout: float = 0.0  # inside the transformers; off because on CPU the masks over
    #   (B, L, d) slow each step (bench/train.py --seq-dropout 0.1; docs/results.md)
    # multi-task head (MMoE)
    n_experts: int = 4  # shared expert MLPs
    expert_dim: int = 64  # hidden and output width of each expert
    tower_dim: int = 32  # hidden width of each task tower

    def __post_init__(self):
        self.tasks = tuple(self.tasks)
        self.task_weights = tuple(float(w) for w in self.task_weights)
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if len(self.task_weights) != len(self.tasks):
            raise ValueError(f"{len(self.tasks)} tasks but {len(self.task_weights)} weights")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        for name in ("id_dropout", "modal_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        # The wide part reads the click rates: where there are none, there is none.
        self.wide_rates = self.wide_rates and self.id_rates and self.uses_ids
        self.taste_rates = self.taste_rates and self.id_rates and self.uses_ids
        self.content_affinity = self.content_affinity and self.uses_modal
        if not 0 <= self.sequence_impressions < self.max_seq_len:
            raise ValueError(f"sequence_impressions must be in [0, max_seq_len "
                             f"{self.max_seq_len}), got {self.sequence_impressions}")
        if self.gap_buckets < 2:
            raise ValueError("gap_buckets must be >= 2 (0 is padding)")
        if self.attention not in ("target", "full"):
            raise ValueError(f"attention must be 'target' or 'full', got {self.attention!r}")

    @property
    def rate_keys(self) -> tuple[str, ...]:
        """The batch keys whose columns, in this order, are the rates the ID module reads
        (``n_rates`` of them); none without ``id_rates``."""
        if not (self.id_rates and self.uses_ids):
            return ()
        return ("item_rates", "user_rates", *(("taste_rates",) if self.taste_rates else ()))

    @property
    def n_rates(self) -> int:
        """Width of the rates the ID module reads (item 2, user 2, taste 4); 0 without."""
        return (4 + 4 * self.taste_rates) if self.id_rates and self.uses_ids else 0

    @property
    def n_wide(self) -> int:
        """Inputs of the wide part: the rates, then the two content cosines."""
        return self.n_rates + 2 * self.content_affinity

    @property
    def uses_ids(self) -> bool:
        return self.variant in ("idrec", "ppm")

    @property
    def uses_modal(self) -> bool:
        return self.variant in ("ppm", "modal")

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (tuples become lists), for checkpoints and JSON."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RankerConfig:
        """Inverse of :meth:`to_dict`; fields missing from ``d`` (added later) get defaults."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown RankerConfig fields {sorted(unknown)} (newer checkpoint?)")
        # Checkpoints from before ``attention`` existed were trained with full attention,
        # those from before ``user_buckets`` without user ids, those from before
        # ``id_rates`` without rates, those from before ``wide_rates`` without a wide part,
        # those from before ``taste_rates`` without the user's taste.
        return cls(**{"attention": "full", "user_buckets": 0, "id_rates": False,
                      "wide_rates": False, "taste_rates": False, **d})


# -----------------------------------------------------------------------------
# Parts


class EncoderLayer(nn.Module):
    """A pre-norm transformer layer: ``x + attention(norm1(x))``, then ``x + ff(norm2(x))``.

    Parameter names are those of ``nn.TransformerEncoderLayer(norm_first=True,
    activation="gelu")``, so checkpoints written with that module load unchanged. It is
    written out for :meth:`attend_target` (and :meth:`attend_shared`): target tokens that
    attend to a sequence's keys and to themselves without taking part in the sequence's
    own attention, and for :meth:`project`, which computes a sequence's queries, keys and
    values once for both.
    """

    def __init__(self, d: int, n_heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.self_attn = nn.Module()  # holds the names nn.MultiheadAttention would
        self.self_attn.in_proj_weight = nn.Parameter(torch.empty(3 * d, d))  # q, k, v rows
        self.self_attn.in_proj_bias = nn.Parameter(torch.zeros(3 * d))
        self.self_attn.out_proj = nn.Linear(d, d)
        nn.init.xavier_uniform_(self.self_attn.in_proj_weight)  # as nn.MultiheadAttention
        nn.init.zeros_(self.self_attn.out_proj.bias)
        self.linear1 = nn.Linear(d, d_ff)
        self.linear2 = nn.Linear(d_ff, d)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)

    def project(self, x: torch.Tensor, query: bool = True) -> tuple[torch.Tensor, ...]:
        """x (N, T, d) -> (q, k, v) of ``norm1(x)``, each (N, heads, T, hd); (k, v) only
        without ``query``."""
        N, T, d = x.shape
        w, b = self.self_attn.in_proj_weight, self.self_attn.in_proj_bias
        if not query:
            w, b = w[d:], b[d:]
        parts = w.shape[0] // d
        out = F.linear(self.norm1(x), w, b).view(N, T, parts, self.n_heads, d // self.n_heads)
        return out.permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor,
                qkv: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """x (N, T, d) -> (N, T, d). ``allowed`` (N or 1, 1, T, T) bool: True where query t
        may attend to key u; no row may be all False. ``qkv``: :meth:`project` of x, if
        already computed."""
        q, k, v = qkv if qkv is not None else self.project(x)
        p = self.dropout if self.training else 0.0
        return self._feed_forward(self._attended(
            x, F.scaled_dot_product_attention(q, k, v, allowed, dropout_p=p)))

    def attend_target(self, target: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      keep: torch.Tensor) -> torch.Tensor:
        """The layer for target tokens (B, d), each attending to its sequence's keys and
        values ``k``, ``v`` (B, heads, L, hd; :meth:`project` of the layer's sequence
        input) where ``keep`` (B, L) is True, and to itself -> (B, d)."""
        t = target.unsqueeze(1)  # (B, 1, d)
        q, k_t, v_t = self.project(t)  # (B, heads, 1, hd) each
        scale = q.shape[-1] ** -0.5
        scores = torch.cat([(q @ k.transpose(-1, -2)).masked_fill(~keep[:, None, None],
                                                                  -torch.inf),
                            (q * k_t).sum(-1, keepdim=True)], dim=-1) * scale  # (B, h, 1, L+1)
        weights = F.dropout(F.softmax(scores, dim=-1), self.dropout, self.training)
        attended = weights[..., :-1] @ v + weights[..., -1:] * v_t  # (B, heads, 1, hd)
        return self._feed_forward(self._attended(t, attended)).squeeze(1)

    def attend_shared(self, target: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      bias: torch.Tensor) -> torch.Tensor:
        """:meth:`attend_target` for targets (B, d) that share one sequence: ``k``, ``v``
        (1, heads, L, hd), and ``bias`` (1, L), 0 where the sequence is kept and -inf
        elsewhere -> (B, d). The heads stay the batch dimension of every product, (heads,
        B, hd) @ (heads, hd, L), so the sequence's keys and values are never copied per
        target, and the mask and the scale are applied within the first product."""
        B, d = target.shape
        h = self.n_heads
        hd = d // h
        qkv = F.linear(self.norm1(target), self.self_attn.in_proj_weight,
                       self.self_attn.in_proj_bias)  # (B, 3d)
        q, k_t, v_t = qkv.view(B, 3, h, hd).permute(1, 2, 0, 3).unbind(0)  # (h, B, hd) each
        scale = hd ** -0.5
        on_seq = torch.baddbmm(bias.unsqueeze(0), q, k[0].transpose(-1, -2),
                               alpha=scale)  # (h, B, L)
        own = (q * k_t).sum(-1, keepdim=True) * scale  # (h, B, 1)
        weights = F.dropout(F.softmax(torch.cat([on_seq, own], dim=-1), dim=-1),
                            self.dropout, self.training)  # (h, B, L+1)
        attended = torch.addcmul(weights[..., :-1] @ v[0], weights[..., -1:], v_t)  # (h, B, hd)
        out = self.self_attn.out_proj(attended.transpose(0, 1).reshape(B, d))  # (B, d)
        return self._feed_forward(target + F.dropout(out, self.dropout, self.training))

    def _attended(self, x: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """x (N, T, d) plus the attention output ``heads`` (N, heads, T, hd) projected."""
        N, _, T, _ = heads.shape
        out = self.self_attn.out_proj(heads.transpose(1, 2).reshape(N, T, -1))
        return x + F.dropout(out, self.dropout, self.training)

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(F.gelu(self.linear1(self.norm2(x))), self.dropout, self.training)
        return x + F.dropout(self.linear2(h), self.dropout, self.training)


class BehaviorTransformer(nn.Module):
    """A bidirectional transformer over [sequence tokens..., target token] -> target's output.

    The caller supplies the content of each token (an id embedding or a projected modal
    vector); this part adds position (counted from the most recent interaction: 1, 2, ...;
    0 marks the target), recency and action embeddings, masks padding out of attention and
    returns the target token's final representation.

    With ``attention="target"`` the sequence tokens do not attend to the target, so the
    sequence is encoded on its own and, layer by layer, the target attends to that layer's
    sequence keys and to itself: the numbers of a full pass over L+1 tokens with the
    target masked from the sequence, without the target's row in the sequence's attention
    and without the last layer's sequence outputs, which nothing reads. A sequence shared by
    many candidates ((1, L) inputs, B targets) is encoded once for all of them.
    """

    def __init__(self, config: RankerConfig):
        super().__init__()
        d = config.d_model
        self.max_seq_len = config.max_seq_len
        self.target_attention = config.attention == "target"
        self.chunk_rows = 64  # rows per length-sorted chunk (_by_length); large enough that
        #   each chunk's matrix products stay efficient, small enough that lengths group: a
        #   whole training batch cut to its longest row is mostly padding (docs/results.md)
        self.pos_emb = nn.Embedding(config.max_seq_len + 1, d)  # 0 target, k = k-th most recent
        self.gap_emb = nn.Embedding(config.gap_buckets, d, padding_idx=0)
        # One more row, IMPRESSION_CODE, where impressions are read (none before they were).
        self.action_emb = nn.Embedding(N_ACTIONS + (config.sequence_impressions > 0), d,
                                       padding_idx=0)
        self.drop = nn.Dropout(config.seq_dropout)
        self.encoder = nn.Module()  # the names nn.TransformerEncoder would give
        self.encoder.layers = nn.ModuleList(
            EncoderLayer(d, config.n_heads, config.d_ff, config.seq_dropout)
            for _ in range(config.n_layers))
        self.encoder.norm = nn.LayerNorm(d)

    def forward(self, seq: torch.Tensor, target: torch.Tensor, batch: dict) -> torch.Tensor:
        """seq (B, L, d) or shared (1, L, d), and target (B, d) contents -> (B, d)."""
        B = target.shape[0]
        seq_len = seq.shape[1]  # L
        if seq_len > self.max_seq_len:
            raise ValueError(f"sequence length {seq_len} > max_seq_len {self.max_seq_len}")
        pos = torch.arange(seq_len, 0, -1, device=seq.device)  # (L,): L ... 1, last slot = 1
        seq = self.drop(seq + self.pos_emb(pos) + self.gap_emb(batch["seq_gap"])
                        + self.action_emb(batch["seq_action"]))  # (B or 1, L, d)
        target = self.drop(target + self.pos_emb.weight[0])  # (B, d)
        keep = batch["seq_mask"]  # (B or 1, L)
        layers = self.encoder.layers
        if not self.target_attention:
            x = torch.cat([seq.expand(B, -1, -1), target.unsqueeze(1)], dim=1)  # (B, L+1, d)
            kept = torch.cat([keep.expand(B, -1), keep.new_ones(B, 1)], dim=1)  # (B, L+1)
            allowed = _allowed(kept)
            for layer in layers:
                x = layer(x, allowed)
            return self.encoder.norm(x[:, -1])  # (B, d)
        if keep.shape[0] > self.chunk_rows:  # one sequence per row, many rows
            return self._by_length(seq, target, keep)
        return self._target_pass(seq, target, keep)

    def _target_pass(self, seq: torch.Tensor, target: torch.Tensor, keep: torch.Tensor
                     ) -> torch.Tensor:
        """Target attention: seq (B or 1, L, d), target (B, d), keep (B or 1, L) -> (B, d)."""
        layers = self.encoder.layers
        allowed = _allowed(keep)  # (B or 1, 1, L, L)
        shared = keep.shape[0] == 1
        if shared:  # (1, L): 0 where kept, -inf elsewhere
            bias = torch.zeros(keep.shape, dtype=seq.dtype, device=seq.device).masked_fill(
                ~keep, -torch.inf)
        for i, layer in enumerate(layers):
            last = i == len(layers) - 1  # the last layer's sequence outputs are never read
            qkv = layer.project(seq, query=not last)
            target = (layer.attend_shared(target, *qkv[-2:], bias) if shared
                      else layer.attend_target(target, *qkv[-2:], keep))
            if not last:
                seq = layer(seq, allowed, qkv)
        return self.encoder.norm(target)  # (B, d)

    def _by_length(self, seq: torch.Tensor, target: torch.Tensor, keep: torch.Tensor
                   ) -> torch.Tensor:
        """:meth:`_target_pass` over rows sorted by how far back their sequence reaches, in
        chunks of ``chunk_rows``, each cut to the span its longest row needs: the padding
        left of it costs nothing. Rows never interact, so the numbers are those of one pass.
        seq (B, L, d), target (B, d), keep (B, L) -> (B, d)."""
        L = keep.shape[1]
        span = torch.where(keep.any(1), L - keep.int().argmax(1), 0)  # (B,): from first kept
        order = span.argsort()
        parts = []
        for rows in order.split(self.chunk_rows):
            n = max(int(span[rows[-1]]), 1)
            parts.append(self._target_pass(seq[rows, L - n:], target[rows], keep[rows, L - n:]))
        return torch.cat(parts)[order.argsort()]


def _allowed(keep: torch.Tensor) -> torch.Tensor:
    """keep (N, T) -> (N, 1, T, T) attention mask: every token attends to the kept ones and
    to itself, so a padding row (or an empty sequence) is never all-masked; no kept token
    attends to padding, so padding never reaches a kept token's output."""
    eye = torch.eye(keep.shape[1], dtype=torch.bool, device=keep.device)
    return (keep.unsqueeze(1) | eye).unsqueeze(1)


class IDModule(nn.Module):
    """IDRec: hashed id embeddings and a transformer over the id sequence.

    :meth:`forward` returns the features (B, out_dim), and the rates it read (see there):
    the transformer's target output (d_model), then the target's own
    embeddings, which go to the MMoE directly: item (d_model), category, brand, shop and
    price (side_dim each), the user's (side_dim, when ``user_buckets``: what the sequence
    cannot say, such as how often this user clicks at all) and, with ``id_rates``, the
    user's and the item's click histories and with ``taste_rates`` the user's on the
    target's profile values (side_dim together). The side features stay
    out of the transformer, so the target token is the same kind of token as the sequence
    items it is compared with.
    """

    def __init__(self, config: RankerConfig):
        super().__init__()
        c = config
        self.item_emb = nn.Embedding(c.item_buckets, c.d_model, padding_idx=0)  # seq + target
        self.category_emb = nn.Embedding(c.category_buckets, c.side_dim, padding_idx=0)
        self.brand_emb = nn.Embedding(c.brand_buckets, c.side_dim, padding_idx=0)
        self.shop_emb = nn.Embedding(c.shop_buckets, c.side_dim, padding_idx=0)
        self.price_emb = nn.Embedding(c.price_buckets, c.side_dim)  # bucket 0 is a real price
        self.user_emb = (nn.Embedding(c.user_buckets, c.side_dim, padding_idx=0)
                         if c.user_buckets else None)
        self.transformer = BehaviorTransformer(c)
        self.rates = nn.Linear(c.n_rates, c.side_dim) if c.id_rates else None
        self.rate_keys = c.rate_keys
        self.id_dropout = c.id_dropout
        self.out_dim = 2 * c.d_model + (4 + bool(c.user_buckets) + c.id_rates) * c.side_dim

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (B, out_dim) features for the MMoE, and with ``id_rates`` the (B, n_rates)
        rates it read (item lift and log shows, user lift and log shows, the item's zeroed
        where id dropout hid the item; then with ``taste_rates`` the user's four taste
        lifts, kept: they describe the item's kind, not its id), else None."""
        item = batch["item_id"]  # (B,)
        dropped = None
        if self.training and self.id_dropout > 0:
            dropped = torch.rand(item.shape, device=item.device) < self.id_dropout  # (B,)
            item = item.masked_fill(dropped, 0)
        target = self.item_emb(item)  # (B, d)
        seq = self.item_emb(batch["seq_item_id"])  # (B, L, d)
        h = self.transformer(seq, target, batch)  # (B, d)
        side = [self.category_emb(batch["category"]), self.brand_emb(batch["brand"]),
                self.shop_emb(batch["shop"]), self.price_emb(batch["price_bucket"])]
        if self.user_emb is not None:
            side.append(self.user_emb(batch["user_id"]).expand(len(item), -1))  # (B, side)
        rates = None
        if self.rates is not None:
            item_rates = batch["item_rates"].to(target.dtype)  # (B, 2)
            if dropped is not None:  # a dropped item is a new one: no history either
                item_rates = item_rates.masked_fill(dropped.unsqueeze(1), 0.0)
            user_rates = batch["user_rates"].to(target.dtype).expand(len(item), -1)  # (B, 2)
            # In the order of RankerConfig.rate_keys; the taste lifts (B, 4) are kept.
            rates = torch.cat([item_rates, user_rates, *(
                batch[k].to(target.dtype) for k in self.rate_keys[2:])], dim=1)  # (B, n_rates)
            side.append(self.rates(rates))  # (B, side)
        return torch.cat([h, target, *side], dim=1), rates  # (B, out_dim), (B, n_rates) | None


class PPMModule(nn.Module):
    """PPM: the behaviour sequence seen through the items' cached modal vectors.

    The (M, modal_dim) table is projected once per forward, then rows are gathered for the
    target and the sequence, so a (B, L, modal_dim) tensor is never built. Row 0 (missing,
    stale or padding) is replaced by a learned vector.
    """

    def __init__(self, config: RankerConfig):
        super().__init__()
        self.modal_dim = config.modal_dim
        self.proj = nn.Sequential(nn.Linear(config.modal_dim, config.d_model),
                                  nn.LayerNorm(config.d_model))
        self.missing = nn.Parameter(torch.zeros(config.d_model))  # stands in for row 0
        self.transformer = BehaviorTransformer(config)
        self.modal_dropout = config.modal_dropout
        self.affinity = config.content_affinity
        if self.affinity:  # set from the training data (trainer.train.start_wide_part)
            self.register_buffer("modal_centre", torch.zeros(config.modal_dim))
        self.out_dim = 2 * config.d_model + 2 * self.affinity

    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        """(N, modal_dim) cached vectors -> (N, d): the per-item part of the module. With
        the module frozen (a plug-in) it is fixed per item, so it can be computed once and
        stored (``trainer.serving.projection``) instead of the raw vectors."""
        if vectors.ndim != 2 or vectors.shape[1] != self.modal_dim:
            raise ValueError(f"modal vectors have shape {tuple(vectors.shape)}, the model "
                             f"expects (M, {self.modal_dim}) (another encoder version?)")
        return self.proj(vectors.to(self.proj[0].weight.dtype))  # the cache may be float16

    def forward(self, batch: dict) -> torch.Tensor:
        """-> (B, 2 d): the transformer's target output, then the target's own projected
        vector, which reaches the MMoE directly (as the target's id embedding does in the ID
        module): for an item nobody has clicked it is the strongest signal there is. With
        ``content_affinity``, (B, 2 d + 2): then :func:`content_cosines` of the raw cached
        vectors, centred on ``modal_centre`` (which a frozen plug-in's projected rows do
        not allow).

        Reads ``modal_table`` (M, modal_dim), or ``modal_projected`` (M, d) when the batch
        carries the rows already projected (:meth:`project`); row 0 is always "missing".
        In training, ``modal_dropout`` masks the table's vectors before the projection
        (unless the projection is frozen); the cosines read them unmasked."""
        given = batch.get("modal_projected")
        if given is not None and self.affinity:
            raise ValueError("content_affinity reads the raw cached vectors; this batch "
                             "carries a frozen plug-in's projections instead")
        if given is None:
            table = batch["modal_table"]  # (M, modal_dim)
            if table.ndim != 2 or table.shape[1] != self.modal_dim:
                raise ValueError(f"modal_table has shape {tuple(table.shape)}, the model "
                                 f"expects (M, {self.modal_dim}) (another encoder version?)")
            vectors = table[1:]
            if self.training and self.modal_dropout > 0 and self.proj[0].weight.requires_grad:
                # One mask per item and step; a frozen projection (a plug-in) learns nothing.
                vectors = F.dropout(vectors.to(self.proj[0].weight.dtype), self.modal_dropout)
            rows = self.project(vectors)
        else:
            rows = given[1:]  # projected already: a frozen plug-in's, or serving's
        projected = torch.cat([self.missing.unsqueeze(0), rows.to(self.missing.dtype)])  # (M, d)
        target = F.embedding(batch["target_modal_row"], projected)  # (B, d)
        seq = F.embedding(batch["seq_modal_row"], projected)  # (B, L, d)
        h = self.transformer(seq, target, batch)  # (B, d)
        if not self.affinity:
            return torch.cat([h, target], dim=1)  # (B, 2d)
        with torch.no_grad():  # inputs, as the rates are: nothing here learns
            cosines = content_cosines(unit_vectors(table, self.modal_centre), batch)
        return torch.cat([h, target, cosines.to(h.dtype)], dim=1)  # (B, 2d + 2)


def unit_vectors(table: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """(M, D) cached vectors, row 0 "missing" -> (M, D) float32: each centred on ``centre``
    (D,) and scaled to unit length, row 0 all zeros. Raw text vectors share a large common
    direction, so their cosines say little until it is taken out."""
    unit = F.normalize(table[1:].float() - centre, dim=-1)
    return torch.cat([unit.new_zeros(1, unit.shape[1]), unit])


def content_cosines(unit: torch.Tensor, batch: dict) -> torch.Tensor:
    """(B, 2): the cosine of each target's vector with the mean vector of its sequence's
    interactions (what the user took), then with that of its impressions (what the user
    was shown, ``RankerConfig.sequence_impressions``); 0 where the target or the sequence
    has no vector of that kind. ``unit``: :func:`unit_vectors` of the batch's table, whose
    rows ``target_modal_row`` (B,) and ``seq_modal_row`` (B, L) or, shared, (1, L) index."""
    target = F.embedding(batch["target_modal_row"], unit)  # (B, D)
    shown = batch["seq_action"] == IMPRESSION_CODE  # (B, L) or (1, L)
    cosines = []
    for kind in (batch["seq_mask"] & ~shown, shown):
        # The kind's vectors summed without a (B, L, D) tensor; only the direction counts.
        total = F.embedding_bag(batch["seq_modal_row"], unit, mode="sum",
                                per_sample_weights=kind.to(unit.dtype))  # (B, D) or (1, D)
        cosines.append((target * F.normalize(total, dim=-1)).sum(-1))  # (1, D) broadcasts
    return torch.stack(cosines, dim=1)


class MMoE(nn.Module):
    """Multi-gate mixture of experts: shared experts, a softmax gate and a tower per task.

    Kept as one module per expert, gate and tower (the checkpoints' names), but computed as
    a few batched products over their stacked weights: at serving's batch of a few hundred
    rows, one product per module cost more in calls than in arithmetic.
    """

    def __init__(self, in_dim: int, config: RankerConfig):
        super().__init__()
        c = config
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(in_dim, c.expert_dim), nn.ReLU(), nn.Dropout(c.dropout),
                          nn.Linear(c.expert_dim, c.expert_dim), nn.ReLU())
            for _ in range(c.n_experts))
        self.gates = nn.ModuleList(nn.Linear(in_dim, c.n_experts) for _ in c.tasks)
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Linear(c.expert_dim, c.tower_dim), nn.ReLU(), nn.Dropout(c.dropout),
                          nn.Linear(c.tower_dim, 1))
            for _ in c.tasks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in_dim) -> logits (B, n_tasks)."""
        B, E, T = x.shape[0], len(self.experts), len(self.towers)
        first = [e[0] for e in self.experts]
        h = F.relu(F.linear(x, torch.cat([m.weight for m in first]),
                            torch.cat([m.bias for m in first])))  # (B, E * H)
        # The first expert's and tower's dropout serve all: one p (config.dropout) for each.
        h = self.experts[0][2](h.view(B, E, first[0].out_features).transpose(0, 1))  # (E, B, H)
        experts = F.relu(_stacked(h, [e[3] for e in self.experts]))  # (E, B, H)
        gates = F.softmax(F.linear(x, torch.cat([g.weight for g in self.gates]),
                                   torch.cat([g.bias for g in self.gates])
                                   ).view(B, T, E), dim=-1)  # (B, T, E)
        mixed = torch.einsum("bte,ebh->tbh", gates, experts)  # (T, B, H)
        hidden = self.towers[0][2](F.relu(_stacked(mixed, [t[0] for t in self.towers]))
                                   )  # (T, B, tower_dim)
        return _stacked(hidden, [t[3] for t in self.towers]).squeeze(-1).T  # (B, T)


def _stacked(x: torch.Tensor, linears: list[nn.Linear]) -> torch.Tensor:
    """x (K, B, in) through K linear layers, the k-th on x[k] -> (K, B, out)."""
    weight = torch.stack([m.weight for m in linears])  # (K, out, in)
    bias = torch.stack([m.bias for m in linears]).unsqueeze(1)  # (K, 1, out)
    return torch.baddbmm(bias, x, weight.transpose(1, 2))


def masked_task_losses(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
                       ) -> torch.Tensor:
    """(n_tasks,): each task's mean BCE over its present labels, 0 for a task without
    any. ``logits``, ``labels``, ``mask``: (B, n_tasks)."""
    # Zero absent labels first: a NaN there would otherwise leak into the gradient.
    labels = torch.where(mask, labels, torch.zeros_like(labels))
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")  # (B, n_tasks)
    bce = torch.where(mask, bce, torch.zeros_like(bce))
    return bce.sum(0) / mask.sum(0).clamp(min=1)  # (n_tasks,)


# -----------------------------------------------------------------------------
# The whole


class UnifiedRanker(nn.Module):
    """IDRec and/or PPM module -> MMoE -> one logit per task (plus, with ``wide_rates``, a
    linear term of the click rates). See the module docstring.

    Example::

        model = UnifiedRanker(RankerConfig(variant="ppm"))
        logits, loss = model(batch)  # (B, 3), scalar (None without "labels")
    """

    def __init__(self, config: RankerConfig):
        super().__init__()
        self.config = config
        self.item_vocabulary: IdVocabulary | None = None
        """The item ids this model admits (``trainer.features.IdVocabulary``), set by the
        trainer from its training data and kept in its checkpoint; the batch builders map
        any other item id to 0. None: every id keeps its bucket (a model never trained)."""
        self.user_vocabulary: IdVocabulary | None = None
        """The same for user ids (``config.user_buckets``)."""
        self.taste_vocabulary: IdVocabulary | None = None
        """(user, profile value) pairs counted in its training data
        (``trainer.features.taste_keys``), with ``config.taste_rates``; None: none."""
        self.trained_tasks: tuple[str, ...] | None = None
        """The tasks (of ``config.tasks``, in that order) whose heads have learned from
        labels: ``trainer.train.fit`` adds those its data holds. A head never trained (no
        order in a ratings data set) outputs noise, so serving reports only these. None: a
        model never trained (a checkpoint from before they were kept loads with all)."""
        self.id_module = IDModule(config) if config.uses_ids else None
        self.ppm = PPMModule(config) if config.uses_modal else None
        in_dim = ((self.id_module.out_dim if self.id_module else 0)
                  + (self.ppm.out_dim if self.ppm else 0))
        self.mmoe = MMoE(in_dim, config)
        self.wide = nn.Linear(config.n_wide, len(config.tasks)) if config.wide_rates else None
        self.register_buffer("task_weights", torch.tensor(config.task_weights), persistent=False)
        self.apply(_init_weights)

    def forward(self, batch: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        parts, rates = [], None
        if self.id_module is not None:
            ids, rates = self.id_module(batch)
            parts.append(ids)  # (B, 2d + 4 to 6 side)
        if self.ppm is not None:
            parts.append(self.ppm(batch))  # (B, 2d), or (B, 2d + 2) with content_affinity
            if self.wide is not None and self.config.content_affinity:
                rates = torch.cat([rates, parts[-1][:, -2:].to(rates.dtype)], dim=1)
        logits = self.mmoe(torch.cat(parts, dim=1))  # (B, n_tasks)
        if self.wide is not None:
            logits = logits + self.wide(rates)  # (B, n_tasks)
        if batch.get("labels") is None:
            return logits, None
        return logits, (self.task_weights * self.task_losses(logits, batch)).sum()

    @staticmethod
    def label_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, n_tasks) bool: the batch's present labels (``label_mask``; all without one)."""
        mask = batch.get("label_mask")
        return (torch.ones_like(batch["labels"], dtype=torch.bool) if mask is None
                else mask.bool())

    @classmethod
    def task_losses(cls, logits: torch.Tensor, batch: dict[str, torch.Tensor]
                    ) -> torch.Tensor:
        """(n_tasks,): each task's mean BCE over the batch's present labels
        (:meth:`label_mask`); the training loss weighs and sums them."""
        return masked_task_losses(logits, batch["labels"].to(logits.dtype),
                                  cls.label_mask(batch))

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _init_weights(module: nn.Module) -> None:
    # Embeddings small (as in GPT-2), padding rows zero; Linear layers keep PyTorch's
    # fan-in scaled default, which suits the ReLU experts and towers.
    if isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, PPMModule):
        nn.init.normal_(module.missing, std=0.02)
    elif isinstance(module, UnifiedRanker) and module.wide is not None:
        # Start as the sum of the two click-rate lifts (columns 0 and 2 of the rates), weights
        # 1: a user's and an item's click histories rank from the first step; the deep
        # part then corrects them. The taste lifts start at 0 (better on the validation
        # worlds than starting them at 1 or 0.5: docs/results.md). A model fitted from
        # scratch then starts from its training data instead (trainer.wide_start).
        with torch.no_grad():
            module.wide.weight.zero_()
            module.wide.weight[:, [0, 2]] = 1.0
            module.wide.bias.zero_()


# -----------------------------------------------------------------------------
# Checkpoints: the config travels with the weights, so any version can be rebuilt

CHECKPOINT_FORMAT = 1
_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


def _check_plain(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str | int):
                raise TypeError(f"{where}: key {k!r} is not a str or int")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise TypeError(f"{where} is a {type(value).__name__}; checkpoints hold only dicts, "
                        "lists, str, numbers, bool, None and tensors (weights_only loading)")


def save_checkpoint(path: str | Path, model: UnifiedRanker, extra: dict[str, Any]) -> None:
    """Write config, weights, the item and user vocabularies, the trained tasks and
    ``extra`` (plain values and tensors only) to ``path``.

    Raises TypeError if ``extra`` holds anything ``torch.load(weights_only=True)`` would
    refuse (numpy arrays, Paths, datetimes): better now than when loading.
    """
    _check_plain(extra, "extra")
    torch.save({"format": CHECKPOINT_FORMAT, "config": model.config.to_dict(),
                "state_dict": model.state_dict(), "extra": dict(extra),
                "trained_tasks": (None if model.trained_tasks is None
                                  else list(model.trained_tasks)),
                **{f"{kind}_vocabulary": None if v is None else v.to_dict()
                   for kind, v in (("item", model.item_vocabulary),
                                   ("user", model.user_vocabulary),
                                   ("taste", model.taste_vocabulary))}},
               path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu"
                    ) -> tuple[UnifiedRanker, dict[str, Any]]:
    """The model (in eval mode) and ``extra`` saved by :func:`save_checkpoint`."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {ckpt.get('format')!r}, "
                         f"expected {CHECKPOINT_FORMAT}")
    model = UnifiedRanker(RankerConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    for kind in ("item", "user", "taste"):  # absent in checkpoints from before they existed
        vocabulary = ckpt.get(f"{kind}_vocabulary")
        setattr(model, f"{kind}_vocabulary",
                None if vocabulary is None else IdVocabulary.from_dict(vocabulary))
    # Absent from checkpoints of before they were kept: every head, as served then.
    tasks = ckpt.get("trained_tasks", list(model.config.tasks))
    model.trained_tasks = None if tasks is None else tuple(tasks)
    return model.eval(), ckpt["extra"]
