"""Learnt word embeddings (textual inversion): a new word's input embedding in the text encoder, trained in place of
a LoRA on the networks.

The embeddings are swapped into the text encoder's embedding output by a forward hook, for the words' own tokens
only. A prompt without the words reaches the text encoder token for token as before, and the encoder's causal
attention lets no token change the ones before it, so that prompt's context is the base's, bit for bit: such an
adapter cannot leak its concept onto prompts that do not name it, nor lose what the base did for them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WORD_EMBEDDINGS = "word_embeddings.safetensors"
"""The weights file of a word-embedding adapter folder: one input embedding per word, keyed by the word."""
IMAGE_START = "@images"
"""The start that names no word (`learn_words` `word=@images`): the word starts from what the teacher's vision encoder
makes of the round's images whose captions name it (`salient_token_mean`), for a concept no word of the base is a
kind of."""


def word_token_ids(tokenizer, words: Sequence[str]) -> dict[str, int]:
    """Each word's token as a caption spells it, after a space. A word the tokenizer splits into several tokens has no
    embedding of its own to learn: it is refused, with its pieces named."""
    ids = {}
    for word in words:
        pieces = tokenizer(" " + word, add_special_tokens=False).input_ids
        if len(pieces) != 1:
            names = tokenizer.convert_ids_to_tokens(pieces)
            raise ValueError(
                f"word {word!r} is {len(pieces)} tokens of this tokenizer ({names}), not one: only a word with a token "
                "of its own has an embedding to learn"
            )
        ids[word] = pieces[0]
    return ids


def spells_any(tokenizer, text: str, token_ids: Sequence[int]) -> bool:
    """Whether `text`, tokenized, holds one of `token_ids`."""
    return not set(tokenizer(text, add_special_tokens=False).input_ids).isdisjoint(token_ids)


def salient_token_mean(images_tokens: Sequence[torch.Tensor], norm: float) -> torch.Tensor:
    """The mean of the tokens that stand out in their image, rescaled to `norm`: a word's start from images of it
    (`IMAGE_START`). A token stands out when it is farther from its image's median token than half the image's
    farthest one. The background is most of an image's tokens and alike from image to image: a mean over every token
    says little of what the images share; the tokens that stand out carry it, and what varies among them (other
    objects, places) averages out. Rescaled because vision tokens are not the size of word embeddings (the nano
    world's are ~400 times as long), and a start of another size would change what a step of `word_lr` means."""
    salient = []
    for tokens in images_tokens:
        distance = (tokens - tokens.median(dim=0).values).norm(dim=-1)
        salient.append(tokens[distance > 0.5 * distance.max()])
    chosen = torch.cat(salient) if salient else torch.empty(0)
    if len(chosen) == 0:
        raise ValueError(
            "no token stands out in the images (none given, or each is uniform): nothing to start a word from"
        )
    mean = chosen.float().mean(dim=0)
    return mean * (norm / mean.norm())


class WordEmbeddings(torch.nn.Module):
    """The learnt input embeddings of some words, swapped in while attached. They start from what the encoder reads for
    the words now (its own embeddings, or those of word embeddings attached before: a starting adapter's), or from
    `starts`, one vector per word (textual inversion starts a new word from a coarse one it is a kind of)."""

    def __init__(self, embedding: torch.nn.Embedding, token_ids: dict[str, int], starts: torch.Tensor | None = None):
        super().__init__()
        if not token_ids:
            raise ValueError("no words to learn")
        self.words = list(token_ids)
        self.token_ids = torch.tensor(list(token_ids.values()), device=embedding.weight.device)
        if starts is None:
            with torch.no_grad():
                starts = embedding(self.token_ids)
        if starts.shape != (len(self.words), embedding.weight.shape[1]):
            raise ValueError(f"start vectors of shape {list(starts.shape)} for {len(self.words)} words")
        # float32 whatever the encoder's dtype: Adam's steps on a bf16 vector would round away.
        self.vectors = torch.nn.Parameter(starts.detach().clone().float().to(embedding.weight.device))
        self.handle = embedding.register_forward_hook(self.swap)

    def swap(self, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        match = torch.eq(inputs[0].unsqueeze(-1), self.token_ids)  # (B, L, words)
        learnt = (match.to(self.vectors.dtype) @ self.vectors).to(output.dtype)
        # where, not a sum of deltas: every other token keeps its embedding exactly.
        return torch.where(match.any(-1, keepdim=True), learnt, output)

    def named_in(self, tokenizer, text: str) -> bool:
        """Whether `text` spells one of the words' tokens: only such a text's context depends on the vectors."""
        return spells_any(tokenizer, text, self.token_ids.tolist())

    def detach_from_encoder(self) -> None:
        self.handle.remove()

    @classmethod
    def load(cls, folder: str | Path, embedding: torch.nn.Embedding, tokenizer) -> WordEmbeddings:
        """Attach the embeddings saved in `folder` to the text encoder whose input embedding is `embedding`."""
        path = Path(folder) / WORD_EMBEDDINGS
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no word embeddings (a word-embedding adapter holds {WORD_EMBEDDINGS})")
        saved = load_file(str(path))
        width = embedding.weight.shape[1]
        wrong = [f"{word} {list(v.shape)}" for word, v in saved.items() if tuple(v.shape) != (width,)]
        if wrong:
            raise ValueError(
                f"{path}: embeddings of another width than this text encoder's [{width}]: {', '.join(wrong)}"
            )
        words = cls(embedding, word_token_ids(tokenizer, list(saved)))
        words.set_vectors(saved)
        return words

    @torch.no_grad()
    def set_vectors(self, saved: dict[str, torch.Tensor]) -> None:
        """Take each word's vector from `saved` (word -> vector, as `save_words` writes them)."""
        self.vectors.copy_(torch.stack([saved[word] for word in self.words]))


def save_words(folder: str | Path, attached: Sequence[WordEmbeddings]) -> Path:
    """Write every word of `attached` (in the order they were attached: a later one's vector for a word wins, as its
    hook swaps in last) into the adapter folder."""
    vectors = {word: v for words in attached for word, v in zip(words.words, words.vectors, strict=True)}
    path = Path(folder) / WORD_EMBEDDINGS
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({word: v.detach().contiguous().cpu() for word, v in vectors.items()}, str(path))
    return path


def holds_words(folder: str | Path) -> bool:
    return (Path(folder) / WORD_EMBEDDINGS).is_file()


@contextmanager
def words_attached(pipeline, folder: str | Path | None) -> Iterator[WordEmbeddings | None]:
    """The adapter's words attached to the pipeline's text encoder while inside (nothing when it holds none)."""
    if folder is None or not holds_words(folder):
        yield None
        return
    words = WordEmbeddings.load(folder, pipeline.text_encoder.get_input_embeddings(), pipeline.tokenizer)
    try:
        yield words
    finally:
        words.detach_from_encoder()
