"""A small, self-built DeepSeek-V3-style tokenizer for randomly initialised checkpoints.

Why the project builds its own tokenizer
----------------------------------------
The toolchain has to work where nothing can be downloaded: no model weights and no
tokenizer files from the Hub. Randomly initialised test checkpoints still need a
tokenizer so that serving, chat templating and generation can be exercised end to
end, so :func:`write_tokenizer` trains a tiny byte-level BPE in-process (on
:data:`TRAINING_CORPUS`, a few paragraphs written for this module) and writes
``tokenizer.json`` + ``tokenizer_config.json`` that ``transformers.AutoTokenizer``
loads offline. Real checkpoints ship their own tokenizer files; the loader uses
those as-is and never calls this module.

What the tokenizer looks like
-----------------------------
* Byte-level BPE (GPT-2 style byte alphabet), so any text round-trips exactly.
* DeepSeek-V3 special tokens, registered as special added tokens so they are never
  split: ``<｜begin▁of▁sentence｜>`` (``bos_token_id``), ``<｜end▁of▁sentence｜>``
  (``eos_token_id``), then ``<｜User｜>``, ``<｜Assistant｜>`` and ``<｜pad｜>`` on the
  lowest free ids. The bars are U+FF5C and the "spaces" U+2581, as in DeepSeek-V3.
* A DeepSeek-V3-style chat template (see :data:`CHAT_TEMPLATE`).

Ids beyond the trained vocabulary
---------------------------------
The corpus is small, so training yields only ~525 tokens (256 bytes + ~270 merges) while model configs use
``vocab_size`` up to 129280, and a randomly initialised model samples ids anywhere
in ``[0, vocab_size)``. With transformers 5.23 / tokenizers 0.23, ``decode`` of an
id the tokenizer does not know does not raise: the id is silently dropped
(``decode([id]) == ""``, ``convert_ids_to_tokens([id]) == [None]``). That hides
what the model actually produced, so the vocabulary is padded instead: every id not
taken by a special or trained token gets a filler token that decodes to
``<｜tok_{id}｜>``. Hence ``len(tokenizer) == vocab_size`` and every id in range
decodes to printable text.

Fillers are plain entries of the BPE model's vocabulary (not added tokens): that is
the most compact encoding in ``tokenizer.json`` (~4.2 MB for 129280 ids, built and
written in ~0.3-0.5 s), and since no BPE merge produces them, encoding never emits
a filler; typing ``<｜tok_5000｜>`` in text yields ordinary byte tokens. Filler
strings are stored in the byte-level alphabet, so the ByteLevel decoder maps them
back to exactly ``<｜tok_{id}｜>``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

__all__ = [
    "ASSISTANT_TOKEN",
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "TRAINING_CORPUS",
    "USER_TOKEN",
    "filler_token",
    "write_tokenizer",
]

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
PAD_TOKEN = "<｜pad｜>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, PAD_TOKEN)

# Upper bound on the number of trained (non-special) tokens: the corpus runs out of
# pairs worth merging long before this, so larger values would change nothing.
MAX_TRAINED_TOKENS = 4096
# Byte-level BPE needs all 256 byte tokens to represent arbitrary text.
_NUM_BYTE_TOKENS = 256
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + _NUM_BYTE_TOKENS

MODEL_MAX_LENGTH = 16384

# Rendered by transformers with ``messages``, ``bos_token``, ``eos_token`` and
# ``add_generation_prompt``. Layout (DeepSeek-V3 style):
#   {bos}{system prompts, joined by blank lines}
#   <｜User｜>{user}<｜Assistant｜>{assistant}{eos} ... [<｜Assistant｜>]
# Every tag uses ``-`` whitespace control, so the line breaks here are not rendered.
CHAT_TEMPLATE = (
    "{{- bos_token -}}\n"
    "{{- messages | selectattr('role', 'equalto', 'system') | map(attribute='content') | join('\\n\\n') -}}\n"
    "{%- for message in messages -%}\n"
    "    {%- if message['role'] == 'user' -%}\n"
    f"        {{{{- '{USER_TOKEN}' + message['content'] -}}}}\n"
    "    {%- elif message['role'] == 'assistant' -%}\n"
    f"        {{{{- '{ASSISTANT_TOKEN}' + message['content'] + eos_token -}}}}\n"
    "    {%- elif message['role'] != 'system' -%}\n"
    "        {{- raise_exception('Unsupported chat role: ' + message['role']) -}}\n"
    "    {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    f"    {{{{- '{ASSISTANT_TOKEN}' -}}}}\n"
    "{%- endif -%}\n"
)

# Original text written for this module; it only has to give BPE something English-like
# to merge. Kept short so that training stays in the low milliseconds.
TRAINING_CORPUS = """\
The old desktop computer in the corner still boots, although it takes a while. First the fans
spin up, then the disk clicks twice, and after about forty seconds a blue login screen appears.
Inside the case there is a processor with 4 cores, 16 GB of memory and a graphics card that was
fast in 2015. Programs are loaded from the disk into memory, and the processor reads one
instruction after another: add these two numbers, compare the result, jump if it is zero.
A compiler turns source code into those instructions, and a good compiler can make a program
run 3 or 4 times faster without changing a single line of the code that people wrote.

Networks connect computers to each other. A message is split into small packets; each packet
carries an address, travels through several routers, and is put back together at the other end.
When a packet is lost, the sender waits for a short time and then sends it again. Most of the
time nobody notices, but on a slow connection a web page can take 10 or 20 seconds to load.

This morning the weather changed three times before lunch. At 7:30 the sky was clear and the air
was cold, about 4 degrees. By 9:00 thick grey clouds had moved in from the west, and a light rain
started to fall. Around noon the wind picked up, the rain stopped, and the sun came out again.
The forecast for tomorrow says: cloudy, a high of 12 degrees, a low of 5, and a 60% chance of
showers in the afternoon. Farmers watch the forecast closely, because a late frost can damage
young plants, while a long dry summer means that the fields need water every few days.

Cooking a simple soup does not need a recipe, only a little patience. Chop one onion, two
carrots and a stick of celery, then warm some oil in a large pot. Cook the vegetables slowly for
ten minutes, until they are soft and sweet. Add a can of tomatoes, 1 litre of stock, a pinch of
salt and some black pepper. Let it simmer for 25 minutes. Taste it! If it is too thin, boil it a
little longer; if it is too thick, add water. Serve the soup hot, with fresh bread and butter.
Bread is easy too: mix 500 g of flour, 7 g of yeast, 10 g of salt and 350 ml of warm water, knead
the dough, let it rise for an hour, shape it, and bake it at 220 degrees for about 35 minutes.

Numbers and symbols: 0 1 2 3 4 5 6 7 8 9, 10, 42, 100, 256, 1024, 3.14, -7, +8, 1/2, 50%.
Punctuation: commas, periods. Questions? Answers! Quotes "like this" and 'like that'; colons:
semicolons; dashes - and (parentheses), [brackets], {braces}, <angle brackets>, a@b.c, #tag,
$5, 2 * 3 = 6, 9 / 3 = 3, x ^ 2, a & b, a | b, ~home, `code`, path/to/file.txt, C:\\temp.
def add(a, b):
    return a + b
"""


def filler_token(token_id: int) -> str:
    """Text that the filler token at ``token_id`` decodes to."""
    return f"<｜tok_{token_id}｜>"


@functools.cache
def _byte_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: byte value -> printable character.

    ``ByteLevel.alphabet()`` gives the characters but not which byte each stands for,
    so the (well-known, fixed) mapping is rebuilt here.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    next_codepoint = 256
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(next_codepoint)
            next_codepoint += 1
    return mapping


def _to_byte_level(text: str) -> str:
    """Spell ``text`` in the byte-level alphabet, the form token strings take in the BPE vocab."""
    table = _byte_to_unicode()
    return "".join(table[b] for b in text.encode("utf-8"))


def _new_byte_level_bpe(vocab: dict[str, int] | None = None, merges: list[tuple[str, str]] | None = None) -> Tokenizer:
    """An (optionally empty) BPE tokenizer with byte-level pre-tokenization and decoding."""
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges) if vocab is not None else models.BPE())
    # No prefix space: "hello" and " hello" must stay distinct for an exact round trip.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


@functools.cache
def _train_bpe(num_tokens: int) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Train on :data:`TRAINING_CORPUS`; return (tokens in id order, merges in rank order).

    Training is deterministic, so the result is cached per size (immutable tuples so
    callers cannot corrupt the cache).
    """
    tokenizer = _new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=num_tokens,
        # Seed all 256 byte tokens, not only the bytes the corpus happens to contain.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_CORPUS.splitlines(keepends=True), trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    tokens = tuple(sorted(model["vocab"], key=model["vocab"].__getitem__))
    merges = tuple((left, right) for left, right in model["merges"])
    return tokens, merges


def _layout(vocab_size: int, bos_token_id: int, eos_token_id: int, trained: tuple[str, ...]) -> dict[str, int]:
    """Assign every id in ``[0, vocab_size)`` a token string (byte-level spelling)."""
    fixed = {bos_token_id: BOS_TOKEN, eos_token_id: EOS_TOKEN}
    free_ids = (i for i in range(vocab_size) if i not in fixed)
    id_to_token: dict[int, str] = dict(fixed)
    # Remaining specials, then trained tokens, take the lowest free ids.
    for token in (USER_TOKEN, ASSISTANT_TOKEN, PAD_TOKEN, *trained):
        id_to_token[next(free_ids)] = token
    for token_id in free_ids:
        id_to_token[token_id] = _to_byte_level(filler_token(token_id))

    vocab = {token: token_id for token_id, token in id_to_token.items()}
    # A filler spelled like a trained token would silently steal its id; the corpus
    # contains no fullwidth bars, so this cannot happen, but make it loud if it ever does.
    if len(vocab) != vocab_size:
        raise RuntimeError("token strings collide while laying out the vocabulary")
    return vocab


def _build(vocab_size: int, bos_token_id: int, eos_token_id: int) -> Tokenizer:
    trained, merges = _train_bpe(min(vocab_size - len(SPECIAL_TOKENS), MAX_TRAINED_TOKENS))
    vocab = _layout(vocab_size, bos_token_id, eos_token_id, trained)
    tokenizer = _new_byte_level_bpe(vocab, list(merges))
    # The specials already sit in the vocab at their ids; registering them as special
    # added tokens keeps those ids and makes encoding match them before BPE runs.
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    # Prepend bos when encoding, like DeepSeek-V3's tokenizer.json does. transformers
    # installs the same template itself because of ``add_bos_token``; this one serves
    # users of the bare ``tokenizers`` library.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_token_id)],
    )
    return tokenizer


def _tokenizer_config() -> dict[str, object]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either the old or the new file, never a partial one."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
        os.replace(tmp_name, path)
    except BaseException:
        # Do not leave a stray temp file behind if writing or renaming failed.
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def write_tokenizer(
    out_dir: str | os.PathLike[str],
    vocab_size: int,
    bos_token_id: int = 0,
    eos_token_id: int = 1,
) -> None:
    """Train a byte-level BPE and write ``tokenizer.json`` + ``tokenizer_config.json`` to ``out_dir``.

    The vocabulary has exactly ``vocab_size`` ids: the five DeepSeek-V3 special tokens
    (bos and eos at the given ids), up to :data:`MAX_TRAINED_TOKENS` trained tokens and,
    for the rest, filler tokens that decode to ``<｜tok_{id}｜>`` (see module docstring).
    ``out_dir`` is created if needed; existing files of the same names are replaced atomically.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {MIN_VOCAB_SIZE} (5 special + 256 byte tokens), got {vocab_size}"
        )
    for name, token_id in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)):
        if not 0 <= token_id < vocab_size:
            raise ValueError(f"{name}={token_id} is outside [0, {vocab_size})")
    if bos_token_id == eos_token_id:
        raise ValueError(f"bos_token_id and eos_token_id must differ, both are {bos_token_id}")

    tokenizer = _build(vocab_size, bos_token_id, eos_token_id)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Compact JSON: pretty-printing would add ~1 MB of whitespace at vocab_size=129280.
    _write_atomic(out / "tokenizer.json", tokenizer.to_str(pretty=False))
    _write_atomic(out / "tokenizer_config.json", json.dumps(_tokenizer_config(), indent=2, ensure_ascii=False) + "\n")
