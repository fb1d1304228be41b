"""Tokenizers: Hugging Face ones (directory or GGUF file) and a character tokenizer for
the built-in tasks that train a model from scratch.

Both kinds expose the small interface fusedrl uses: ``encode(text) -> list[int]``,
``decode(ids) -> str``, ``eos_token_ids``, ``pad_token_id``, ``vocab_size`` and
``render_prompt(prompt, chat_template)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from fusedrl.models.checkpoint import CheckpointError


class Tokenizer(Protocol):
    vocab_size: int
    pad_token_id: int
    eos_token_ids: tuple[int, ...]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def render_prompt(self, prompt: str | list[dict], chat_template: bool) -> list[int]: ...


class CharTokenizer:
    """One token per character of a fixed alphabet, after ``<pad>``, ``<bos>``, ``<eos>``."""

    PAD, BOS, EOS = 0, 1, 2

    def __init__(self, alphabet: str):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError(f"tokenizer alphabet {alphabet!r} repeats a character")
        self.alphabet = alphabet
        self._ids = {c: i + 3 for i, c in enumerate(alphabet)}
        self.vocab_size = len(alphabet) + 3
        self.pad_token_id = self.PAD
        self.bos_token_id = self.BOS
        self.eos_token_ids = (self.EOS,)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the tokenizer alphabet "
                             f"{self.alphabet!r}") from None

    def decode(self, ids) -> str:
        return "".join(self.alphabet[i - 3] for i in ids if i >= 3)

    def render_prompt(self, prompt, chat_template: bool = False) -> list[int]:
        if not isinstance(prompt, str):
            raise ValueError("the character tokenizer takes plain-text prompts, not messages")
        return [self.BOS, *self.encode(prompt)]

    def to_hf(self):
        """The same tokenizer as a ``transformers`` fast tokenizer (one token per
        character, ``<bos>`` prepended, pads on the left), for checkpoints that
        ``AutoTokenizer`` loads."""
        from tokenizers import Tokenizer as Core
        from tokenizers import decoders, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

        vocab = {"<pad>": self.PAD, "<bos>": self.BOS, "<eos>": self.EOS}
        vocab.update({c: i for c, i in self._ids.items()})
        core = Core(models.WordLevel(vocab, unk_token="<pad>"))
        core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
        core.decoder = decoders.Fuse()  # characters joined without spaces
        core.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", self.BOS)])
        return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>",
                                       bos_token="<bos>", eos_token="<eos>",
                                       padding_side="left")

    def save_pretrained(self, directory: str) -> None:
        self.to_hf().save_pretrained(directory)


class HFTokenizer:
    """Adapter over a ``transformers`` tokenizer."""

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = len(tok)
        eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        # Chat models end a turn with a special token that may differ from eos.
        for special in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
            tid = tok.convert_tokens_to_ids(special)
            if isinstance(tid, int) and tid != tok.unk_token_id and tid is not None:
                eos.add(tid)
        self.eos_token_ids = tuple(sorted(eos))
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.pad_token_id = int(pad if pad is not None else 0)
        self.bos_token_id = tok.bos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False).input_ids)

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def render_prompt(self, prompt, chat_template: bool = False) -> list[int]:
        from fusedrl.data.prompts import format_prompt

        if chat_template or not isinstance(prompt, str):
            # The rendered template already holds its special tokens.
            return self.encode(format_prompt(prompt, self.tok, chat_template=True))
        return list(self.tok(prompt).input_ids)

    def save_pretrained(self, directory: str) -> None:
        """The tokenizer files (chat template included), with the pad token fusedrl pads
        with named in them (many chat tokenizers have none)."""
        tok = self.tok
        if tok.pad_token_id is None:
            import copy

            tok = copy.deepcopy(tok)
            tok.pad_token = tok.convert_ids_to_tokens(self.pad_token_id)
        tok.save_pretrained(directory)


def load_hf_tokenizer(path: str | Path) -> HFTokenizer:
    """Tokenizer of a checkpoint directory, or the one embedded in a GGUF file."""
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        if path.suffix == ".gguf":
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load its tokenizer ({type(e).__name__}: {e})") \
            from None
    return HFTokenizer(tok)
