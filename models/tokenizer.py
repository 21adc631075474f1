"""Tokenizer: a `tokenizers.Tokenizer` plus the chat template and special tokens, built from an HF folder or a GGUF."""
from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any

import tokenizers
from gguf import GGUFReader
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

# llama.cpp's `tokenizer.ggml.token_type` value for control tokens (<|im_start|>, <|endoftext|>, ...).
_CONTROL = 3


class Tokenizer:
    """Text <-> ids and chat rendering, independent of where the vocabulary came from."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        chat_template: str | list[dict[str, str]] | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.unk_token, self.pad_token = unk_token, pad_token

    @classmethod
    def from_folder(cls, path: str | Path) -> "Tokenizer":
        """Read an HF tokenizer folder: tokenizer.json, tokenizer_config.json (or chat_template.jinja),
        and special_tokens_map.json for the special tokens tokenizer_config.json does not name (older
        repos keep them only there)."""
        folder = Path(path)
        if not (folder / "tokenizer.json").is_file():
            raise ValueError(f"no tokenizer.json in {folder}: only fast (tokenizers) tokenizers are supported; "
                             f"transformers' AutoTokenizer.from_pretrained(folder).save_pretrained(folder) writes one")
        cfg, special = _read_json(folder / "tokenizer_config.json"), _read_json(folder / "special_tokens_map.json")
        template = cfg.get("chat_template")
        if template is None and (folder / "chat_template.jinja").exists():
            template = (folder / "chat_template.jinja").read_text()
        return cls(
            tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")),
            chat_template=template,
            **{key: _token_str(cfg.get(key) or special.get(key))
               for key in ("bos_token", "eos_token", "unk_token", "pad_token")},
        )

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json + tokenizer_config.json that `transformers.AutoTokenizer` loads as this tokenizer."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(out / "tokenizer.json"))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "chat_template": self.chat_template,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")

    @cached_property
    def special_tokens(self) -> frozenset[str]:
        """The special tokens' texts (<|im_end|>, ...): `decode` leaves them out of output text."""
        return frozenset(t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt's ids with the special tokens the tokenizer adds (a Llama's BOS), as transformers
        and vLLM encode a completion prompt; a text that already begins with the BOS token (a
        rendered chat template) does not get a second one. Tool results use `encode`: no BOS
        in the middle of a context."""
        has_bos = self.bos_token is not None and text.startswith(self.bos_token)
        return self.encode(text, add_special_tokens=not has_bos)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """The prompt text for `messages`, rendered by transformers' own jinja setup so templates behave as on the Hub.
        `tools` (JSON schemas) reach templates that render them (see `supports_tools`)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        return self._hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                            tools=tools)

    @property
    def supports_tools(self) -> bool:
        """Whether the chat template renders a `tools` list itself. A tokenizer_config.json may hold
        a list of named templates: transformers renders a call with tools by `tool_use`, else `default`."""
        template = self.chat_template
        if isinstance(template, list):
            named = {t["name"]: t["template"] for t in template}
            template = named.get("tool_use", named.get("default"))
        return template is not None and "tools" in template

    @cached_property
    def _hf(self) -> Any:
        # Imported lazily: transformers costs ~1 s to import and only the chat template needs it. Its
        # import-time advice that PyTorch is missing is about models, which it does not run here.
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(
            tokenizer_object=self.tokenizer,
            chat_template=self.chat_template,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            unk_token=self.unk_token,
            pad_token=self.pad_token,
        )

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.tokenizer.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.tokenizer.token_to_id(self.eos_token)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)


def tokenizer_from_gguf(path: str | Path) -> Tokenizer:
    """Rebuild the byte-level BPE tokenizer a GGUF describes (llama.cpp `gpt2` model, as SmolLM2 uses).

    The pre-tokenizer matches SmolLM2's tokenizer.json (and llama.cpp's `smollm` regex): digits split
    one by one, then GPT-2's byte-level regex.
    """
    reader = GGUFReader(str(path))

    def get(key: str) -> Any:
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    model, pre = get("tokenizer.ggml.model"), get("tokenizer.ggml.pre")
    if model != "gpt2" or pre not in _PRE_TOKENIZERS:
        raise ValueError(
            f"unsupported GGUF tokenizer model={model!r} pre={pre!r} in {path}: "
            f"only byte-level BPE ('gpt2') with pre in {sorted(_PRE_TOKENIZERS)} is supported"
        )
    tokens: list[str] = get("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ")) for m in get("tokenizer.ggml.merges")]
    tok = tokenizers.Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False, byte_fallback=False)
    )
    tok.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    types = get("tokenizer.ggml.token_type") or []
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL])

    def token(key: str) -> str | None:
        idx = get(f"tokenizer.ggml.{key}")
        return None if idx is None else tokens[idx]

    return Tokenizer(
        tok,
        chat_template=get("tokenizer.chat_template"),
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
    )


def _byte_level() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


_PRE_TOKENIZERS = {
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level()]),
    "gpt2": _byte_level,
}


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _token_str(value: str | dict[str, Any] | None) -> str | None:
    """tokenizer_config.json spells a special token as a string or as an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value
