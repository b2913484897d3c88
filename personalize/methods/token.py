"""A new word for the subject: a placeholder token whose embedding rows are the only thing that trains.

Instead of letting the optimizer touch the whole embedding matrix and copying the other rows back after
every step (the diffusers example), the new rows live in their own parameter and are spliced in at
lookup. Every other row is never written, so it stays bit-identical by construction, and the optimizer
state is the new rows instead of the whole vocabulary.

A multi-vector token (`method.new_token.num_vectors: n`) is n new tokens, named as stock diffusers'
`load_textual_inversion` names the rows of an [n, dim] embedding: the placeholder, then `<placeholder>_1`
... `<placeholder>_{n-1}`; a prompt names the placeholder alone and is spelled out to the n tokens
before it is tokenized (`expand_placeholder`), as the stock pipeline's `maybe_convert_prompt` does.
"""

from __future__ import annotations

import torch
from torch import nn

from personalize.errors import PersonalizeError


class NewTokenEmbedding(nn.Module):
    """Drop-in for the text encoder's token embedding: ids >= `first_new_id` read `new_rows`."""

    def __init__(self, base: nn.Embedding, first_new_id: int):
        super().__init__()
        self.base = base
        self.first_new_id = first_new_id
        self.new_rows = nn.Parameter(base.weight[first_new_id:].detach().clone().float())

    @property
    def weight(self) -> torch.Tensor:  # transformers reads `.weight` for the dtype/device of embeddings
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        is_new = input_ids >= self.first_new_id
        new = self.new_rows[(input_ids - self.first_new_id).clamp(min=0)].to(out.dtype)
        return torch.where(is_new.unsqueeze(-1), new, out)

    @torch.no_grad()
    def merged(self) -> nn.Embedding:
        """A plain nn.Embedding with the trained rows written in (for saving a whole text encoder)."""
        merged = nn.Embedding.from_pretrained(self.base.weight.detach().clone(), freeze=False)
        merged.weight[self.first_new_id:] = self.new_rows.to(merged.weight.dtype)
        return merged


def token_names(placeholder: str, num_vectors: int = 1) -> list[str]:
    """The tokens of a placeholder of `num_vectors` vectors, in the stock loader's names and order."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def expand_placeholder(prompt: str, placeholder: str, num_vectors: int = 1) -> str:
    """The prompt with the placeholder spelled out as its tokens ('<sks>' -> '<sks> <sks>_1 <sks>_2'),
    replacing every occurrence as diffusers' `maybe_convert_prompt` does; unchanged for one vector."""
    if num_vectors == 1:
        return prompt
    return prompt.replace(placeholder, " ".join(token_names(placeholder, num_vectors)))


def check_new_token(tokenizer, placeholder: str, initializer: str, num_vectors: int = 1,
                    tokenizer_name: str | None = None) -> list[int]:
    """Validate a new placeholder and its initializer against the base tokenizer; the initializer's one id.

    The placeholder must be new: an existing word (one token already, e.g. 'dog' -> 'dog</w>') would be
    shadowed wherever it appears, class prompts included. So must the names of its extra vectors.
    `tokenizer_name` (a family with several text encoders: `tokenizer_2`, SDXL's OpenCLIP or FLUX's T5) is
    named in the messages, since a word can be one token in one vocabulary and several in the other.
    """
    vocabulary = f"{tokenizer_name}'s vocabulary" if tokenizer_name else "the tokenizer's vocabulary"
    where = f" in {tokenizer_name}" if tokenizer_name else ""
    if not placeholder or any(c.isspace() for c in placeholder):
        raise PersonalizeError(
            f"placeholder '{placeholder}' is empty or has spaces: use one new string such as '<my-dog>' with method.identifier"
        )
    existing = tokenizer.encode(placeholder, add_special_tokens=False)
    if placeholder in tokenizer.get_vocab() or len(existing) == 1:
        word = tokenizer.convert_ids_to_tokens(existing)[0] if len(existing) == 1 else placeholder
        raise PersonalizeError(
            f"placeholder '{placeholder}' is already in {vocabulary} (as '{word}'): choose a new "
            "string such as '<my-dog>' with method.identifier"
        )
    taken = [name for name in token_names(placeholder, num_vectors)[1:] if name in tokenizer.get_vocab()]
    if taken:
        raise PersonalizeError(
            f"placeholder '{placeholder}' with method.new_token.num_vectors={num_vectors} needs the new tokens "
            f"{', '.join(token_names(placeholder, num_vectors)[1:])}, but {taken[0]} is already in {vocabulary}: "
            "choose another method.identifier"
        )
    init_ids = tokenizer.encode(initializer, add_special_tokens=False)
    if len(init_ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(init_ids)
        raise PersonalizeError(
            f"initializer word '{initializer}' is {len(init_ids)} tokens{where} ({' '.join(pieces)}), not one: "
            "choose a single-token word (e.g. the last word of the class noun) with method.new_token.initializer"
        )
    return init_ids


def add_placeholder_token(tokenizer, text_encoder, placeholder: str, initializer: str,
                          num_vectors: int = 1, tokenizer_name: str | None = None) -> NewTokenEmbedding:
    """Add `placeholder` (and, for several vectors, `<placeholder>_1`...) to the vocabulary, every new row
    initialised from the one-token word `initializer`.

    Returns the embedding module now installed in `text_encoder`.
    """
    init_ids = check_new_token(tokenizer, placeholder, initializer, num_vectors, tokenizer_name)
    names = token_names(placeholder, num_vectors)
    if tokenizer.add_tokens(names) != len(names):
        raise PersonalizeError(
            f"placeholder '{placeholder}' is already in the tokenizer's vocabulary: choose a new string "
            "such as '<my-dog>' with method.identifier"
        )
    new_ids = tokenizer.convert_tokens_to_ids(names)
    if new_ids != list(range(new_ids[0], new_ids[0] + len(names))) or new_ids[-1] != len(tokenizer) - 1:
        raise PersonalizeError(f"the tokenizer gave the new tokens {names} the ids {new_ids}, not the last ones in "
                               "order: use a tokenizer without added tokens of its own")
    # mean_resizing=False: the new rows are overwritten below, so skip the costly covariance of the vocabulary
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    embeddings = text_encoder.get_input_embeddings()
    with torch.no_grad():
        embeddings.weight[new_ids] = embeddings.weight[init_ids[0]].clone()
    wrapped = NewTokenEmbedding(embeddings, first_new_id=new_ids[0])
    text_encoder.set_input_embeddings(wrapped)
    return wrapped
