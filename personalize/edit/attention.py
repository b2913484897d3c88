"""Prompt-to-prompt attention control (after Hertz et al., 2022), as diffusers attention processors.

Every attention layer of the UNet gets a `ControlledAttnProcessor`. It computes the attention
probabilities explicitly (the fused SDPA kernels never expose them), hands them to a controller and
uses whatever the controller returns. Controllers see only the conditional half of a classifier-free
guidance batch, laid out as one row per prompt: `[source, target_1, ...]`.

- `AttentionStore` records cross-attention maps (averaged over heads, summed over layers and steps)
  and changes nothing: for visualisation and for the LocalBlend mask.
- `Replace`, `Refine`, `Reweight` inject the source prompt's maps into the target rows.
- `LocalBlend` keeps the target latent equal to the source latent outside the edited words' region.

Token positions always come from `prompt_tokens`, which tokenizes word by word, so a word that the
tokenizer splits into several BPE pieces ("zebra" -> z e b r a) is one unit in every mapping. Where the keys
are built from several tokenizers' sequences (SDXL concatenates its two CLIP encoders' hidden states position
by position), `shared_prompt_tokens` checks that they all place every word at the same positions.

Nothing here depends on the UNet's layout: every attention layer there is gets a processor (SDXL's transformer
blocks stack several per block, some of its down blocks have none), and a map's size is found from its query
count and the latent size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Window = float | tuple[float, float]
_PUNCTUATION = ",.;:!?\"'"


# --------------------------------------------------------------------------------------------------
# Prompt -> token positions


@dataclass(frozen=True)
class PromptTokens:
    """Where each whitespace-separated word of a prompt lands in the padded token sequence.

    `spans[i]` are the positions (BOS is position 0) of word `words[i]`; `ids[i]` their token ids.
    `length` counts BOS, the word tokens and EOS; positions `length-1 .. max_length-1` are EOS/padding.
    """

    prompt: str
    words: tuple[str, ...]
    ids: tuple[tuple[int, ...], ...]
    spans: tuple[tuple[int, ...], ...]
    length: int
    max_length: int

    def find(self, word: str) -> list[int]:
        """Indices of the words equal to `word` (case-insensitive, ignoring sentence punctuation)."""
        query = word.lower()
        return [
            i for i, w in enumerate(self.words)
            if w.lower() == query or w.lower().strip(_PUNCTUATION) == query.strip(_PUNCTUATION)
        ]

    def positions(self, words: Sequence[str]) -> list[int]:
        """Token positions of all occurrences of `words` in this prompt."""
        return [p for word in words for i in self.find(word) for p in self.spans[i]]


def prompt_tokens(tokenizer, prompt: str, convert: Callable[[str], str] | None = None) -> PromptTokens:
    """Tokenize `prompt` word by word so each word knows its token positions.

    CLIP's pre-tokenizer never merges across whitespace, so the concatenation of per-word tokens is the
    prompt's tokenization; we check that rather than assume it. `convert` rewrites a word before
    tokenizing; pass `lambda s: pipe.maybe_convert_prompt(s, pipe.tokenizer)` so a multi-vector
    textual-inversion token ("<cat-toy>" -> "<cat-toy> <cat-toy>_1 ...") counts all its vectors.
    """
    convert = convert or (lambda s: s)
    max_length = int(tokenizer.model_max_length)
    words = tuple(prompt.split())
    ids = tuple(tuple(tokenizer(convert(w), add_special_tokens=False).input_ids) for w in words)
    whole = tokenizer(convert(prompt), add_special_tokens=False).input_ids
    if [t for word_ids in ids for t in word_ids] != list(whole):
        raise ValueError(f"word-by-word tokenization of {prompt!r} differs from the prompt's own; "
                         "put spaces around the words you want to edit")
    spans, pos = [], 1
    for word_ids in ids:
        # A prompt longer than the context is truncated to keep EOS at max_length-1; so are the spans.
        spans.append(tuple(p for p in range(pos, pos + len(word_ids)) if p < max_length - 1))
        pos += len(word_ids)
    return PromptTokens(prompt, words, ids, tuple(spans), min(pos + 1, max_length), max_length)


def shared_prompt_tokens(tokenizers: Sequence[tuple[object, Callable[[str], str] | None]],
                         prompt: str) -> PromptTokens:
    """`prompt_tokens` of the first (tokenizer, convert) pair, checked against every other pair.

    Cross-attention key i is made of every encoder's hidden state at position i, so one mapping serves them
    all only if each tokenizer puts each word at the same positions and ends at the same length. SDXL's two
    CLIP tokenizers share a vocabulary and do (they differ in the padding token, which the tail mapping covers
    by position); a token added to one of them only (a textual-inversion token loaded into one encoder)
    would split differently and the maps would point at other words, so that is an error.
    """
    (first_tokenizer, first_convert), *others = tokenizers
    tokens = prompt_tokens(first_tokenizer, prompt, first_convert)
    for index, (tokenizer, convert) in enumerate(others, start=2):
        other = prompt_tokens(tokenizer, prompt, convert)
        if (other.spans, other.length, other.max_length) != (tokens.spans, tokens.length, tokens.max_length):
            differ = [w for w, a, b in zip(tokens.words, tokens.spans, other.spans) if a != b] or list(tokens.words)
            raise ValueError(f"the model's tokenizers split {prompt!r} differently (tokenizer 1 and {index} disagree "
                             f"from the word {differ[0]!r} on): prompt-to-prompt needs every word at the same "
                             "token positions in all of them; load a textual-inversion token into every text "
                             "encoder, or edit without that word")
    return tokens


def _tail_pairs(src: PromptTokens, tgt: PromptTokens) -> Iterator[tuple[int, int]]:
    """(source, target) EOS and padding positions, aligned from each prompt's EOS on.

    They carry much of the attention in SD, so they are mapped too. The source position may run past the
    end when the target has more padding; callers decide whether to clamp or drop those.
    """
    for k in range(tgt.max_length - tgt.length + 1):
        yield src.length - 1 + k, tgt.length - 1 + k


def replace_mapping(src: PromptTokens, tgt: PromptTokens) -> torch.Tensor:
    """[L_src, L_tgt] matrix M with target maps = source maps @ M, for prompts with equally many words.

    Word i of the source feeds word i of the target. Equal words map token to token; a word replaced
    by one with a different number of tokens spreads its attention evenly over the new word's tokens,
    so each row sums to 1: the word keeps the attention mass it had, and maps stay distributions.
    """
    if len(src.words) != len(tgt.words):
        raise ValueError(f"Replace needs prompts with the same number of words, got {len(src.words)} "
                         f"and {len(tgt.words)}; use Refine for added or removed words")
    m = torch.zeros(src.max_length, tgt.max_length)
    m[0, 0] = 1.0  # BOS
    for s_span, t_span, s_ids, t_ids in zip(src.spans, tgt.spans, src.ids, tgt.ids):
        if s_ids == t_ids and len(s_span) == len(t_span):
            for s, t in zip(s_span, t_span):
                m[s, t] = 1.0
        elif s_span and t_span:
            for s in s_span:
                m[s, list(t_span)] = 1.0 / len(t_span)
    last = src.length - 1
    for s, t in _tail_pairs(src, tgt):
        if s < src.max_length:
            m[s, t], last = 1.0, s
    # A longer target has fewer padding slots: the source's surplus padding goes to the last one, so
    # every row of M sums to 1 and the edited maps stay distributions over the target's tokens.
    m[last + 1:, tgt.max_length - 1] = 1.0
    return m


def _align_words(src: Sequence[tuple[int, ...]], tgt: Sequence[tuple[int, ...]]) -> list[tuple[int, int]]:
    """Longest common subsequence of two word lists (compared by token ids): matched (i_src, j_tgt) pairs.

    No substitutions: a changed word is a deletion plus an insertion, so Refine lets it keep its own
    attention instead of inheriting the maps of a different word.
    """
    n, k = len(src), len(tgt)
    best = [[0] * (k + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(k - 1, -1, -1):
            best[i][j] = best[i + 1][j + 1] + 1 if src[i] == tgt[j] else max(best[i + 1][j], best[i][j + 1])
    pairs, i, j = [], 0, 0
    while i < n and j < k:
        if src[i] == tgt[j]:
            pairs.append((i, j))
            i, j = i + 1, j + 1
        elif best[i + 1][j] >= best[i][j + 1]:
            i += 1
        else:
            j += 1
    return pairs


def refine_mapping(src: PromptTokens, tgt: PromptTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [L_tgt] long, alpha [L_tgt]) with target map t = alpha*source[index[t]] + (1-alpha)*own.

    Words common to both prompts (word-level alignment, so multi-token words move as a whole) take the
    source's maps; inserted words keep their own attention (alpha 0).
    """
    index = torch.arange(tgt.max_length).clamp(max=src.max_length - 1)
    alpha = torch.ones(tgt.max_length)
    for t_span in tgt.spans:
        alpha[list(t_span)] = 0.0
    for i, j in _align_words(src.ids, tgt.ids):
        for s, t in zip(src.spans[i], tgt.spans[j]):
            index[t], alpha[t] = s, 1.0
    for s, t in _tail_pairs(src, tgt):
        index[t], alpha[t] = min(s, src.max_length - 1), 1.0  # surplus target padding reads the last pad
    return index, alpha


def word_weights(tokens: PromptTokens, weights: dict[str, float]) -> torch.Tensor:
    """[L] multipliers: `weights[word]` on every token of every occurrence of that word, 1 elsewhere."""
    eq = torch.ones(tokens.max_length)
    for word, weight in weights.items():
        positions = tokens.positions([word])
        if not positions:
            raise ValueError(f"word {word!r} is not in the prompt {tokens.prompt!r}")
        eq[positions] = float(weight)
    return eq


# --------------------------------------------------------------------------------------------------
# Processors


@dataclass(frozen=True)
class AttnMeta:
    """What a controller knows about the attention call it is handed."""

    name: str  # processor name, e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"
    place: str  # "down", "mid" or "up"
    is_cross: bool
    heads: int
    height: int  # spatial size of the query map
    width: int
    downsample: int  # latent side / map side: 1 at full latent resolution


def spatial_size(seq_len: int, latent_hw: tuple[int, int] | None) -> tuple[int, int]:
    """Map size of a flattened query sequence, found by halving the latent size as the UNet does.

    UNet downsamplers are stride-2 convs with padding 1, i.e. ceil(n/2), so an odd latent side (e.g. 12
    -> 6 -> 3) and non-square latents are handled; nothing assumes 64x64 latents or 16x16 maps.
    """
    if latent_hw is not None:
        h, w = latent_hw
        for _ in range(16):
            if h * w == seq_len:
                return h, w
            h, w = (h + 1) // 2, (w + 1) // 2
    side = math.isqrt(seq_len)
    if side * side == seq_len:
        return side, side
    raise ValueError(f"cannot infer a spatial size for {seq_len} query tokens with latents {latent_hw}")


class ControlledAttnProcessor:
    """diffusers' plain AttnProcessor, with the attention probabilities routed through a controller."""

    def __init__(self, controller: AttentionStore, name: str) -> None:
        self.controller = controller
        self.name = name
        self.place = name.split(".")[0].split("_")[0]  # down_blocks / mid_block / up_blocks

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        map_hw = None
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            map_hw = (height, width)
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        is_cross = encoder_hidden_states is not None
        batch_size, key_len, _ = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape
        attention_mask = attn.prepare_attention_mask(attention_mask, key_len, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        # QK-norm layers (newer diffusers Attention) normalise over the head dim, any layout works.
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)

        probs = attn.get_attention_scores(query, key, attention_mask)
        if map_hw is None:
            map_hw = spatial_size(query.shape[1], self.controller.latent_hw)
        latent_h = self.controller.latent_hw[0] if self.controller.latent_hw else map_hw[0]
        meta = AttnMeta(self.name, self.place, is_cross, attn.heads, map_hw[0], map_hw[1],
                        max(1, round(latent_h / map_hw[0])))
        probs = self.controller(probs, meta)

        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, *map_hw)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def controlled_attention(unet, controller: AttentionStore) -> Iterator[None]:
    """Route every attention layer of `unet` through `controller`; restore the original processors after."""
    original = unet.attn_processors
    unet.set_attn_processor({name: ControlledAttnProcessor(controller, name) for name in original})
    try:
        yield
    finally:
        unet.set_attn_processor(original)


# --------------------------------------------------------------------------------------------------
# Controllers


def step_window(window: Window, num_steps: int) -> tuple[int, int]:
    """Step range [start, end) from a fraction f (the first f of the steps) or a (start, end) fraction pair."""
    start, end = (0.0, float(window)) if isinstance(window, (int, float)) else (float(window[0]), float(window[1]))
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"step window must be a fraction or (start, end) fractions in [0, 1], got {window}")
    return int(start * num_steps), int(end * num_steps)


class AttentionStore:
    """Pass-through controller that records cross-attention maps; the base of every controller.

    Maps are kept per (place, kind, height, width): the sum over layers and steps of the head-averaged
    probabilities of the conditional rows, shape [n_prompts, height*width, keys]. Self-attention maps
    are kept only when `store_self` (they are [hw, hw]: 64 MB per layer at SD's 64x64 latents).
    """

    def __init__(self, store_self: bool = False) -> None:
        self.store_self = store_self
        self.num_steps = 1
        self.cur_step = 0
        self.latent_hw: tuple[int, int] | None = None
        self.n_prompts = 1
        self.cfg = False
        self.sums: dict[tuple[str, str, int, int], torch.Tensor] = {}
        self.counts: dict[tuple[str, str, int, int], int] = {}

    def begin(self, num_steps: int, latent_hw: tuple[int, int], n_prompts: int, cfg: bool) -> None:
        """Called by the sampler before the first step; `cfg` says the UNet batch is [uncond..., cond...]."""
        self.num_steps, self.latent_hw, self.n_prompts, self.cfg = num_steps, tuple(latent_hw), n_prompts, cfg
        self.cur_step = 0
        self.sums.clear()
        self.counts.clear()

    def __call__(self, probs: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
        n, heads = self.n_prompts, meta.heads
        batch = probs.shape[0] // heads
        if batch != (2 * n if self.cfg else n):
            return probs  # a UNet call this controller was not set up for: leave it alone
        start = (batch - n) * heads  # only the conditional branch is recorded and edited
        cond = probs[start:].reshape(n, heads, *probs.shape[1:])
        if meta.is_cross or self.store_self:
            self._record(meta, cond)
        edited = self.edit(cond, meta)
        if edited is cond:
            return probs
        out = probs.clone()
        out[start:] = edited.reshape(-1, *probs.shape[1:]).to(probs.dtype)
        return out

    def _record(self, meta: AttnMeta, cond: torch.Tensor) -> None:
        key = (meta.place, "cross" if meta.is_cross else "self", meta.height, meta.width)
        maps = cond.detach().float().mean(1)
        self.sums[key] = self.sums[key] + maps if key in self.sums else maps
        self.counts[key] = self.counts.get(key, 0) + 1

    def edit(self, cond: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
        """[n_prompts, heads, queries, keys] -> the same shape; return `cond` itself for no change."""
        return cond

    def step_end(self, latents: torch.Tensor) -> torch.Tensor:
        """Called by the sampler after each denoising step with [n_prompts, C, h, w] latents."""
        self.cur_step += 1
        return latents

    def average(self) -> dict[tuple[str, str, int, int], torch.Tensor]:
        """Mean map per (place, kind, height, width) over all recorded layers and steps."""
        return {key: total / self.counts[key] for key, total in self.sums.items()}

    def cross_maps(self, prompt_index: int = 0, size: tuple[int, int] | None = None) -> torch.Tensor:
        """[h, w, keys] cross-attention of one prompt, averaged over all layers resized to `size`.

        `size` defaults to the largest recorded map. Every resolution is used: with any latent size the
        set of map sizes differs, so choosing e.g. "the 16x16 layers" would not generalise.
        """
        maps = {k: v for k, v in self.average().items() if k[1] == "cross"}
        if not maps:
            raise ValueError("no cross-attention maps recorded: run a sampler with this controller first")
        if size is None:
            size = max(((k[2], k[3]) for k in maps), key=lambda hw: hw[0] * hw[1])
        resized = [
            _resize(v[prompt_index].T.reshape(1, -1, k[2], k[3]), size)[0]  # [keys, h, w]
            for k, v in maps.items()
        ]
        return torch.stack(resized).mean(0).permute(1, 2, 0)


def _resize(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


class LocalBlend:
    """Keep the edit local: outside a mask the target latent is reset to the source latent each step.

    The mask comes from the cross-attention of the chosen words (looked up in every prompt), averaged
    over layers and steps so far, upsampled to the latent size, dilated a little, min-max normalised per
    prompt and thresholded; a target's mask is the union of its own and the source's (the old object's region
    must be free to change, and so must the new one's).
    """

    def __init__(self, token_weights: torch.Tensor, threshold: float = 0.3, start: float = 0.2) -> None:
        self.token_weights = token_weights  # [n_prompts, keys]: 1 on the chosen words' tokens
        self.threshold = threshold
        self.start = start  # fraction of the steps to run before blending: the maps settle first
        self.last_mask: torch.Tensor | None = None

    @classmethod
    def from_words(cls, prompts: Sequence[PromptTokens], words: Sequence[str], threshold: float = 0.3,
                   start: float = 0.2) -> LocalBlend:
        weights = torch.zeros(len(prompts), prompts[0].max_length)
        for i, tokens in enumerate(prompts):
            weights[i, tokens.positions(words)] = 1.0
        if not weights.any():
            raise ValueError(f"none of the blend words {list(words)} occur in the prompts")
        return cls(weights, threshold, start)

    def mask(self, store: AttentionStore, latent_hw: tuple[int, int]) -> torch.Tensor:
        """[n_prompts, 1, h, w] boolean mask at latent resolution."""
        maps = []
        for (_, kind, h, w), avg in store.average().items():
            if kind != "cross":
                continue
            weights = self.token_weights.to(avg.device, avg.dtype)
            word_map = torch.einsum("nqk,nk->nq", avg, weights).reshape(-1, 1, h, w)
            maps.append(_resize(word_map, latent_hw))
        heat = torch.stack(maps).mean(0)
        radius = max(1, min(latent_hw) // 16)  # ~ one 16x16-map cell at SD's 64x64 latents, scales with size
        heat = F.max_pool2d(heat, 2 * radius + 1, stride=1, padding=radius)
        # Min-max rather than prompt-to-prompt's max-only normalisation: identical where the background
        # ignores the word (trained SD), and still a region, not everything, when no map is near zero.
        low = heat.flatten(1).amin(1).view(-1, 1, 1, 1)
        high = heat.flatten(1).amax(1).view(-1, 1, 1, 1)
        heat = (heat - low) / (high - low).clamp_min(1e-12)
        return heat > self.threshold

    def __call__(self, latents: torch.Tensor, store: AttentionStore) -> torch.Tensor:
        if store.cur_step < int(self.start * store.num_steps):
            return latents
        mask = self.mask(store, tuple(latents.shape[-2:]))
        mask = mask | mask[:1]
        self.last_mask = mask
        # torch.where, not a weighted sum: outside the mask the target *is* the source latent, bit for bit.
        blended = torch.where(mask[1:].to(latents.device), latents[1:], latents[:1])
        return torch.cat([latents[:1], blended])


class EditController(AttentionStore):
    """Base of the prompt-to-prompt edits: rows are [source, target_1, ...]; the source is never changed.

    Cross-attention: within `cross_steps`, targets get `edit_cross(source maps, target maps)`.
    Self-attention: within `self_steps`, targets get the source's self-attention (it carries the layout),
    only at layers downsampled at least `self_min_downsample` times from the latent, as prompt-to-prompt
    does (16x16 and coarser at SD's 64x64 latents): the fine layers then keep the target's own detail.
    """

    def __init__(self, cross_steps: Window = 0.8, self_steps: Window = 0.4, self_min_downsample: int = 4,
                 local_blend: LocalBlend | None = None, store_self: bool = False) -> None:
        super().__init__(store_self=store_self)
        self.cross_steps, self.self_steps = cross_steps, self_steps
        self.self_min_downsample = self_min_downsample
        self.local_blend = local_blend

    def _in(self, window: Window) -> bool:
        start, end = step_window(window, self.num_steps)
        return start <= self.cur_step < end

    def edit(self, cond: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
        if cond.shape[0] < 2:
            return cond
        source, targets = cond[0], cond[1:]
        if meta.is_cross:
            if not self._in(self.cross_steps):
                return cond
            new = self.edit_cross(source, targets)
        else:
            if not self._in(self.self_steps) or meta.downsample < self.self_min_downsample:
                return cond
            new = source.unsqueeze(0).expand_as(targets)
        return torch.cat([source.unsqueeze(0), new.to(cond.dtype)])

    def edit_cross(self, source: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """source [heads, q, keys], targets [m, heads, q, keys] -> new target maps [m, heads, q, keys]."""
        raise NotImplementedError

    def step_end(self, latents: torch.Tensor) -> torch.Tensor:
        if self.local_blend is not None:
            latents = self.local_blend(latents, self)
        return super().step_end(latents)


class Replace(EditController):
    """Word swap: target maps = source maps through a [keys_src, keys_tgt] mapping per target."""

    def __init__(self, source: PromptTokens, targets: Sequence[PromptTokens], **kwargs) -> None:
        super().__init__(**kwargs)
        self.mapper = torch.stack([replace_mapping(source, t) for t in targets])  # [m, Ls, Lt]

    def edit_cross(self, source: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        mapper = self.mapper.to(source.device, source.dtype)
        return torch.einsum("hqs,mst->mhqt", source, mapper)


class Refine(EditController):
    """Added/removed words: aligned tokens take the source maps, new words keep their own attention."""

    def __init__(self, source: PromptTokens, targets: Sequence[PromptTokens], **kwargs) -> None:
        super().__init__(**kwargs)
        pairs = [refine_mapping(source, t) for t in targets]
        self.index = torch.stack([p[0] for p in pairs])  # [m, Lt]
        self.alpha = torch.stack([p[1] for p in pairs])  # [m, Lt]

    def edit_cross(self, source: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        gathered = source[..., self.index.to(source.device)]  # [heads, q, m, Lt]
        gathered = gathered.permute(2, 0, 1, 3)
        alpha = self.alpha.to(source.device, source.dtype)[:, None, None, :]
        return gathered * alpha + targets * (1 - alpha)


class Reweight(EditController):
    """Scale chosen words' cross-attention in the targets (`weights`: [m, keys] multipliers).

    With a `base` edit (Replace/Refine) the base's maps are reweighted, so the edits compose; without
    one the *source* maps are reweighted, the prompt-to-prompt way to strengthen or weaken a word of an
    unchanged prompt while keeping the picture. The base only supplies the mapping: the step windows
    and local blend of this controller apply.
    """

    def __init__(self, weights: torch.Tensor, base: EditController | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.weights = weights if weights.ndim == 2 else weights.unsqueeze(0)
        self.base = base

    def edit_cross(self, source: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        new = self.base.edit_cross(source, targets) if self.base is not None else source.unsqueeze(0)
        return new * self.weights.to(source.device, source.dtype)[:, None, None, :]
