"""Byte-level BPE tokenizer: a thin wrapper around a Hugging Face `tokenizers.Tokenizer`.

Design choices:

- Training uses `tokenizers`' BPE trainer with the full byte-level initial
  alphabet, so every byte is encodable and `decode(encode(text)) == text`
  holds for any UTF-8 text. No normalizer, no post-processor: `encode` never
  adds special tokens; callers (templates, packing) place EOS explicitly.
- The leading-space convention is set once (`ADD_PREFIX_SPACE = False`) and
  used for both the pre-tokenizer and the decoder of trained tokenizers.
- Text is text: `encode` sets the backend's `encode_special_tokens` flag, so a
  special-token string written inside user text (e.g. a literal
  "<|im_end|>") is split into ordinary byte-level tokens and never becomes a
  special id. Only the chat templates emit special ids, by looking them up
  with `token_to_id`. Non-special added tokens of an imported tokenizer
  (minimind's `<think>`, `<tool_call>`) are still matched, as Hugging Face
  does; they decode to their own text, so round trips still hold. The flag
  is not serialised by `tokenizers`, so it is re-applied on load and unpickle.
- Padding always has its own id (TRL #1623: pad == EOS teaches a model never
  to stop). An imported tokenizer whose pad is missing or doubles as a real
  token (eos, bos, unk, `<|endoftext|>` or a chat marker; minimind's
  `<|endoftext|>` is pad, unk and our EOS) gets a new special `<|pad|>`
  appended at the end of the vocabulary, and a warning is logged.
- Imported `tokenizer.json` files are loaded as they are; the user's file is
  never rewritten. minimind's decoder says `add_prefix_space: true` while its
  pre-tokenizer says false. The `tokenizers` ByteLevel decoder ignores that
  flag (round trips with leading spaces hold, see the tests), but we still
  align the in-memory decoder with the pre-tokenizer (the side that decides
  the ids), so a saved copy is self-consistent and cannot drift if a future
  version starts honouring the flag.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
BEGIN_OF_TEXT = "<|begin_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT_ID = "<|eot_id|>"

#: Chat markers every freshly trained tokenizer carries (ChatML and Llama-3 style).
CHAT_SPECIAL_TOKENS: tuple[str, ...] = (
    IM_START,
    IM_END,
    BEGIN_OF_TEXT,
    START_HEADER,
    END_HEADER,
    EOT_ID,
)
#: Special tokens of a freshly trained tokenizer, in id order (EOS is id 0, pad id 1).
DEFAULT_SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN, PAD_TOKEN, *CHAT_SPECIAL_TOKENS)

#: One leading-space convention for both pre-tokenizer and decoder.
ADD_PREFIX_SPACE = False

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
LEGACY_CHAT_TEMPLATE_FILE = "chat_template.json"


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes tokens either as a string or as an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _chat_template_of(folder: Path, config: dict[str, Any]) -> str | None:
    """The folder's default Jinja chat template, looked up in `transformers`' order."""
    jinja = folder / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    value = config.get("chat_template")
    source = f"{folder / CONFIG_FILE}: chat_template"
    if value is None and (folder / LEGACY_CHAT_TEMPLATE_FILE).is_file():
        value = _read_json(folder / LEGACY_CHAT_TEMPLATE_FILE).get("chat_template")
        source = f"{folder / LEGACY_CHAT_TEMPLATE_FILE}: chat_template"
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ValueError(f"{source}: a list of templates without a 'default' one (names: {sorted(map(str, named))})")
    raise ValueError(f"{source}: expected a string, got {type(value).__name__}")


def _token_config(folder: Path) -> dict[str, Any]:
    """`tokenizer_config.json` with the special tokens `special_tokens_map.json` names (a legacy
    config, without `added_tokens_decoder`, takes the map's; a newer one only fills its gaps)."""
    config: dict[str, Any] = {}
    config_file = folder / CONFIG_FILE
    if config_file.is_file():
        config = _read_json(config_file)
    map_file = folder / SPECIAL_TOKENS_MAP_FILE
    if map_file.is_file():
        token_map = _read_json(map_file)
        legacy = "added_tokens_decoder" not in config
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            if key in token_map and (legacy or config.get(key) is None):
                config[key] = token_map[key]
    return config


def _dedicated_pad(backend: tokenizers.Tokenizer, config: dict[str, Any], eos: str, file: Path) -> str:
    """The config's pad token if it is a dedicated one, else `PAD_TOKEN` (added to `backend` when absent).

    A pad that is also a token the model reads or writes would be masked
    wherever it really occurs; only a dedicated pad is kept.
    """
    pad = _token_content(config.get("pad_token"))
    taken = {eos, EOS_TOKEN, *CHAT_SPECIAL_TOKENS}
    taken.update(
        t for t in (_token_content(config.get(k)) for k in ("bos_token", "unk_token")) if t
    )
    if pad is not None and pad not in taken and backend.token_to_id(pad) is not None:
        return pad
    reason = "missing" if pad is None else f"{pad!r} is not a dedicated token"
    if backend.token_to_id(PAD_TOKEN) is None:
        backend.add_special_tokens([tokenizers.AddedToken(PAD_TOKEN, special=True, normalized=False)])
        log.warning(
            "%s: pad token %s; added %s as new special id %d at the end of the vocabulary",
            file,
            reason,
            PAD_TOKEN,
            backend.token_to_id(PAD_TOKEN),
        )
    return PAD_TOKEN


class Tokenizer:
    """Byte-level BPE tokenizer with an explicit EOS and a dedicated pad token.

    Build one with `train`, `train_from_files` or `from_file`; the constructor
    wraps an existing `tokenizers.Tokenizer` whose eos and pad tokens are
    already in its vocabulary.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        eos_token: str = EOS_TOKEN,
        pad_token: str = PAD_TOKEN,
        bos_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        self._backend = backend
        self._backend.encode_special_tokens = True
        for name, token in (("bos", bos_token), ("unk", unk_token)):
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(f"{name} token {token!r} is not in the tokenizer's vocabulary")
        if chat_template is not None and not isinstance(chat_template, str):
            raise ValueError(f"chat_template must be a str, got {type(chat_template).__name__}")
        #: Named special tokens besides eos/pad (None: the tokenizer has none); templates read them.
        self.bos_token = bos_token
        self.unk_token = unk_token
        #: The model's own Jinja chat template (None: none was given); `template: auto` renders it.
        self.chat_template = chat_template
        self._rendered_backend: tokenizers.Tokenizer | None = None
        eos_id = backend.token_to_id(eos_token)
        pad_id = backend.token_to_id(pad_token)
        if eos_id is None:
            raise ValueError(f"eos token {eos_token!r} is not in the tokenizer's vocabulary")
        if pad_id is None:
            raise ValueError(f"pad token {pad_token!r} is not in the tokenizer's vocabulary")
        if pad_id == eos_id:
            raise ValueError(
                f"pad token {pad_token!r} and eos token {eos_token!r} share id {eos_id}; "
                "padding needs its own id or the end-of-text token is masked away (TRL #1623)"
            )
        self.eos_token = eos_token
        self.pad_token = pad_token
        self._eos_id = eos_id
        self._pad_id = pad_id
        # The tokenizer is immutable after construction, so these are cached.
        vocab = backend.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1
        added = backend.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, tok in added.items() if tok.special)
        if sum(1 for i in vocab.values() if i == pad_id) != 1:
            raise ValueError(f"pad id {pad_id} is shared by several token strings")

    # ------------------------------------------------------------------ build
    @classmethod
    def _new_backend(cls) -> tokenizers.Tokenizer:
        backend = tokenizers.Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=ADD_PREFIX_SPACE)
        # Its options are fixed up by `_align_decoder` after training.
        backend.decoder = decoders.ByteLevel()
        return backend

    @classmethod
    def _trainer(
        cls,
        vocab_size: int,
        min_frequency: int,
        special_tokens: Sequence[str] | None,
        show_progress: bool,
    ) -> trainers.BpeTrainer:
        extra = CHAT_SPECIAL_TOKENS if special_tokens is None else tuple(special_tokens)
        # EOS and pad always come first, whatever the caller passes.
        specials = list(dict.fromkeys((EOS_TOKEN, PAD_TOKEN, *extra)))
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        minimum = len(alphabet) + len(specials)
        if vocab_size < minimum:
            raise ValueError(
                f"vocab_size={vocab_size} is below the {len(alphabet)} byte symbols "
                f"plus {len(specials)} special tokens ({minimum})"
            )
        return trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=specials,
            initial_alphabet=alphabet,
            show_progress=show_progress,
        )

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        *,
        min_frequency: int = 2,
        special_tokens: Sequence[str] | None = None,
        show_progress: bool = True,
    ) -> Tokenizer:
        """Train a byte-level BPE tokenizer on an iterable of texts.

        `special_tokens` replaces the chat markers (default
        `CHAT_SPECIAL_TOKENS`); EOS and pad are always added, as ids 0 and 1.
        `vocab_size` counts the special tokens and the 256 byte symbols.
        """
        trainer = cls._trainer(vocab_size, min_frequency, special_tokens, show_progress)
        backend = cls._new_backend()
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(_align_decoder(backend))

    @classmethod
    def train_from_files(
        cls, files: Sequence[str | Path], vocab_size: int, **kw: Any
    ) -> Tokenizer:
        """Like `train`, reading plain-text files (keyword options as in `train`)."""
        paths = [str(Path(f)) for f in files]
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"training files not found: {missing}")
        trainer = cls._trainer(
            vocab_size,
            kw.pop("min_frequency", 2),
            kw.pop("special_tokens", None),
            kw.pop("show_progress", True),
        )
        if kw:
            raise TypeError(f"unexpected keyword arguments: {sorted(kw)}")
        backend = cls._new_backend()
        backend.train(paths, trainer=trainer)
        return cls(_align_decoder(backend))

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a `tokenizer.json` (or a directory holding one) unchanged.

        A `tokenizer_config.json` beside it (and `special_tokens_map.json`)
        may name `eos_token`, `pad_token`, `bos_token` and `unk_token`. eos:
        the config's, else `<|endoftext|>` if present, else an error. pad: the
        config's if it is a dedicated token, else `<|pad|>` (appended as a new
        special token when absent). bos/unk: kept when they are in the
        vocabulary. The chat template: see the module docstring.
        """
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer file at {file}")
        backend = _align_decoder(tokenizers.Tokenizer.from_file(str(file)))

        config_file = file.parent / CONFIG_FILE
        config = _token_config(file.parent)
        chat_template = _chat_template_of(file.parent, config)

        eos = _token_content(config.get("eos_token"))
        if eos is None:
            if backend.token_to_id(EOS_TOKEN) is None:
                raise ValueError(
                    f"{file}: cannot tell the end-of-text token: no 'eos_token' in "
                    f"{config_file.name} and no {EOS_TOKEN!r} in the vocabulary"
                )
            eos = EOS_TOKEN
        elif backend.token_to_id(eos) is None:
            raise ValueError(f"{config_file}: eos_token {eos!r} is not in {file.name}")

        pad = _dedicated_pad(backend, config, eos, file)
        named = {}
        for key in ("bos_token", "unk_token"):
            token = _token_content(config.get(key))
            if token is not None and backend.token_to_id(token) is None:
                log.warning("%s: %s %r is not in %s; ignored", config_file, key, token, file.name)
                token = None
            named[key] = token
        return cls(backend, eos_token=eos, pad_token=pad, chat_template=chat_template, **named)

    def save(self, directory: str | Path) -> Path:
        """Write `tokenizer.json` and a small `tokenizer_config.json` (with the chat
        template, if any); return the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(directory / TOKENIZER_FILE))
        chat = [t for t in CHAT_SPECIAL_TOKENS if self.token_to_id(t) is not None]
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            **{k: v for k, v in (("bos_token", self.bos_token), ("unk_token", self.unk_token)) if v is not None},
            "additional_special_tokens": chat,
            "add_bos_token": False,
            "add_eos_token": False,
            # transformers' default clean-up would break exact round trips.
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return directory

    def to_json(self) -> str:
        """Everything that decides the ids (backend JSON plus the eos/pad choice) as one
        JSON string; usable as a cache key for encoded corpora."""
        head = json.dumps({"eos_token": self.eos_token, "pad_token": self.pad_token})
        return f'{head[:-1]}, "tokenizer": {self._backend.to_str()}}}'

    # ------------------------------------------------------------------ use
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no special tokens added, special strings stay text."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_rendered(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets of a rendered chat template, whose special-token
        strings are markers (they become their special ids); nothing is added.

        Only for text a template produced: message contents must be checked for
        special strings before rendering (see `special_tokens`).
        """
        if self._rendered_backend is None:
            # A second backend that matches special strings; the main one never does.
            self._rendered_backend = tokenizers.Tokenizer.from_str(self._backend.to_str())
            self._rendered_backend.encode_special_tokens = False
        encoding = self._rendered_backend.encode(text, add_special_tokens=False)
        return encoding.ids, [tuple(o) for o in encoding.offsets]

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """The strings of all special added tokens, longest first."""
        added = self._backend.get_added_tokens_decoder()
        return tuple(sorted({t.content for t in added.values() if t.special}, key=lambda t: (-len(t), t)))

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens as `transformers` passes them to a chat template."""
        named = {"bos_token": self.bos_token, "eos_token": self.eos_token, "unk_token": self.unk_token, "pad_token": self.pad_token}
        return {k: v for k, v in named.items() if v is not None}

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many texts at once (parallel in the Rust backend). `encode_batch_fast` gives the
        same ids without computing character offsets, which nothing here reads (tokenizers >= 0.21)."""
        encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self._backend.id_to_token(int(id))

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def vocab_size(self) -> int:
        """Embedding rows needed: max id + 1, added tokens included."""
        return self._vocab_size

    @property
    def special_ids(self) -> frozenset[int]:
        return self._special_ids

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer` (encode through `Tokenizer.encode`, not this)."""
        return self._backend

    def __len__(self) -> int:
        return self._vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}:{self.eos_id}, "
            f"pad={self.pad_token!r}:{self.pad_id})"
        )

    # Pickling goes through the JSON form, which drops encode_special_tokens.
    def __getstate__(self) -> dict[str, Any]:
        return {
            "json": self._backend.to_str(),
            "eos": self.eos_token,
            "pad": self.pad_token,
            "bos": self.bos_token,
            "unk": self.unk_token,
            "chat_template": self.chat_template,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        backend = tokenizers.Tokenizer.from_str(state["json"])
        self.__init__(  # type: ignore[misc]
            backend,
            eos_token=state["eos"],
            pad_token=state["pad"],
            bos_token=state.get("bos"),
            unk_token=state.get("unk"),
            chat_template=state.get("chat_template"),
        )


def _align_decoder(backend: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """Return `backend` with a top-level ByteLevel decoder's add_prefix_space set to the
    pre-tokenizer's. The Python `decoders.ByteLevel` constructor ignores its options
    (tokenizers 0.23), so the flag is set in the JSON form; in memory only.
    """
    spec = json.loads(backend.to_str())
    pre, dec = spec.get("pre_tokenizer") or {}, spec.get("decoder") or {}
    if pre.get("type") != "ByteLevel" or dec.get("type") != "ByteLevel":
        return backend
    if pre.get("add_prefix_space"):
        log.warning(
            "pre-tokenizer adds a prefix space: decode(encode(text)) will gain a leading space"
        )
    if dec.get("add_prefix_space") == pre.get("add_prefix_space"):
        return backend
    log.debug("aligning ByteLevel decoder add_prefix_space with the pre-tokenizer")
    dec["add_prefix_space"] = bool(pre.get("add_prefix_space"))
    return tokenizers.Tokenizer.from_str(json.dumps(spec))
