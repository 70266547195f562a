"""Text <-> token ids for a Hugging Face model directory, without `transformers`.

Reads what `save_pretrained` writes: tokenizer.json (the `tokenizers` pipeline), tokenizer_config.json
(special tokens, add_bos_token, chat template) and, if present, chat_template.jinja, config.json and
generation_config.json (extra EOS ids). Behaviour matches `transformers.AutoTokenizer` for encode,
decode and apply_chat_template, which the unit tests check against HF itself.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers.decoders import DecodeStream


class Tokenizer:
    """A loaded tokenizer. Immutable after construction; safe to share between threads."""

    def __init__(
        self, tok: tokenizers.Tokenizer, config: dict[str, Any], model_eos_ids: Sequence[int] = ()
    ) -> None:
        self._tok = tok
        self.bos_token = _token_content(config.get("bos_token"))
        self.eos_token = _token_content(config.get("eos_token"))
        self.pad_token = _token_content(config.get("pad_token"))
        self.bos_token_id = self._id_of(self.bos_token)
        self.pad_token_id = self._id_of(self.pad_token)
        self.add_bos_token = bool(config.get("add_bos_token", False))
        self.chat_template: str | None = _pick_template(config.get("chat_template"))
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)
        eos_ids = set(model_eos_ids)
        if (eos_id := self._id_of(self.eos_token)) is not None:
            eos_ids.add(eos_id)
        # Any of these ends generation: a chat model may stop on <|im_end|> as well as <|endoftext|>.
        self.eos_token_ids: frozenset[int] = frozenset(eos_ids)
        self.all_special_ids: frozenset[int] = frozenset(
            i for i, t in tok.get_added_tokens_decoder().items() if t.special
        )
        self._template: jinja2.Template | None = None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """Load from a model directory. A missing tokenizer.json or tokenizer_config.json raises
        FileNotFoundError naming the path; config.json, generation_config.json are optional."""
        root = Path(model_dir)
        tok_path, cfg_path = root / "tokenizer.json", root / "tokenizer_config.json"
        for path in (tok_path, cfg_path):
            if not path.is_file():
                raise FileNotFoundError(f"tokenizer file not found: {path}")
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
        # transformers >= 4.43 saves the template as its own file; it wins over the config key.
        if (jinja_path := root / "chat_template.jinja").is_file():
            config["chat_template"] = jinja_path.read_text(encoding="utf-8")
        eos_ids: list[int] = []
        for name in ("config.json", "generation_config.json"):
            if (path := root / name).is_file():
                eos_ids += _as_id_list(json.loads(path.read_text(encoding="utf-8")).get("eos_token_id"))
        return cls(tokenizers.Tokenizer.from_file(str(tok_path)), config, eos_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. With add_special_tokens, tokenizer.json's post-processor runs and a bos
        is prepended if tokenizer_config asks for one (add_bos_token) and the post-processor did not.
        (transformers 5 ignores add_bos_token when tokenizer.json exists; v4's Llama tokenizer, which
        wrote those configs, honoured it. Hub tokenizer.json files add the bos themselves, so both
        agree on real checkpoints.)"""
        ids: list[int] = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        bos = self.bos_token_id if add_special_tokens and self.add_bos_token else None
        if bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Invalid or incomplete UTF-8 becomes U+FFFD (as in HF); ids outside the
        vocabulary (padded embedding rows) decode to nothing."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_stream(
        self, skip_special_tokens: bool = True, context: Sequence[int] = ()
    ) -> Callable[[int], str | None]:
        """Incremental decoding (``tokenizers.decoders.DecodeStream``): a function of the next token
        id returning its new text, or None while it ends in an incomplete character. ``context``:
        ids already seen (their text is not returned), so the first token decodes as it reads after
        them."""
        stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        for token_id in context:
            stream.step(self._tok, token_id)
        return functools.partial(stream.step, self._tok)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` with the model's Jinja chat template, as HF does: sandboxed, trim_blocks
        and lstrip_blocks, `raise_exception`/`strftime_now` globals, special tokens as variables,
        extra kwargs (tools, enable_thinking, ...) passed through. tokenize=True returns ids encoded
        without added special tokens (the template carries them). No template -> ValueError."""
        if self.chat_template is None:
            raise ValueError("chat_template: this tokenizer has no chat template")
        if self._template is None:
            self._template = _compile(self.chat_template)
        # Like HF: only the special tokens that exist are defined, and tools/documents default to None
        # (templates test `tools is not none`, which an undefined variable would pass).
        specials = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        variables = {k: v for k, v in specials.items() if v is not None} | {"tools": None, "documents": None}
        variables |= kwargs
        text = self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)


def _token_content(value: Any) -> str | None:
    # tokenizer_config stores special tokens either as a string or as a serialized AddedToken.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _pick_template(value: Any) -> str | None:
    # Some checkpoints store several named templates; HF uses the one called "default".
    if isinstance(value, list):
        named = {t["name"]: t["template"] for t in value}
        return named.get("default")
    return value


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:  # fmt: skip
    # Jinja's built-in tojson HTML-escapes <, >, & and '; HF's does not, and templates expect HF's.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)
