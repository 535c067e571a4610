"""Text evaluation sets: GLUE STS-B dev (sentence similarity) and WikiText-2 raw test (perplexity).

    pairs = get_dataset("stsb_dev", limit=500)          # first 500 of 1,500 (sentence1, sentence2, score)
    corpus = get_dataset("wikitext2_test", limit=2048)  # token budget 2,048 (tokenized at evaluation)
    ids = corpus.windows(tokenizer, window=512)         # LongTensor [4, 512], non-overlapping

Files (see ../shared/data/README.md): `rex.paths.data_root()/glue-stsb-dev/dev.tsv` and
`rex.paths.data_root()/wikitext-2-raw/wiki.test.raw`, or a folder given as `root=`. The bundled copies are
checked against the sha256 the README states; a user's copy is checked for format (columns, row count,
scores in 0..5; UTF-8 text).
"""
from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from .. import paths
from ..errors import ConfigError, DatasetError

STSB_DIR, STSB_FILE = "glue-stsb-dev", "dev.tsv"
STSB_SHA256 = "65f79065d85d2135210f502830b4413bb7f3136c2f078d3d19faa59ac69edac6"
STSB_PAIRS = 1500
WIKITEXT_DIR = "wikitext-2-raw"
WIKITEXT_SHA256 = {"test": "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"}
WIKITEXT_BYTES = {"test": 1290547}
DEFAULT_WINDOW = 512
DEFAULT_TOKENS = 2048


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _folder(root: Optional[os.PathLike], default: str) -> Tuple[Path, bool]:
    """(folder, is_the_bundled_copy)."""
    if root is not None:
        return Path(root).expanduser(), False
    return paths.data_root() / default, True


# --------------------------------------------------------------------------------------------- STS-B

@dataclass
class SentencePairs:
    """Sentence pairs with gold similarity scores (STS-B: 0..5). Items: (sentence1, sentence2, score)."""

    pairs: List[Tuple[str, str, float]]
    path: Optional[Path] = None
    name: str = "stsb_dev"

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> Tuple[str, str, float]:
        return self.pairs[i]

    @property
    def scores(self) -> torch.Tensor:
        return torch.tensor([p[2] for p in self.pairs], dtype=torch.float64)


def read_stsb(path: Path) -> List[Tuple[str, str, float]]:
    """Parse a GLUE STS-B tsv (header with sentence1, sentence2, score). Tabs only, no quoting (GLUE's
    sentences contain unbalanced quotes)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path} is not UTF-8 text ({exc}); use GLUE's STS-B dev.tsv") from None
    rows = list(csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise DatasetError(f"{path} is empty; use GLUE's STS-B dev.tsv (1,500 pairs)")
    header = rows[0]
    try:
        i1, i2, isc = header.index("sentence1"), header.index("sentence2"), header.index("score")
    except ValueError:
        raise DatasetError(f"{path} has no sentence1/sentence2/score columns in its header ({header[:10]}); "
                           "use GLUE's STS-B dev.tsv") from None
    pairs = []
    for n, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise DatasetError(f"{path} line {n} has {len(row)} tab-separated fields, the header {len(header)}: "
                               "the file is truncated or corrupted; use GLUE's STS-B dev.tsv")
        try:
            score = float(row[isc])
        except ValueError:
            raise DatasetError(f"{path} line {n}: score {row[isc]!r} is not a number; the file is corrupted") from None
        if not 0.0 <= score <= 5.0:
            raise DatasetError(f"{path} line {n}: score {score} outside STS-B's 0..5; the file is corrupted")
        pairs.append((row[i1], row[i2], score))
    if not pairs:
        raise DatasetError(f"{path} holds no sentence pairs; use GLUE's STS-B dev.tsv (1,500 pairs)")
    return pairs


def stsb_dev(root: Optional[os.PathLike] = None, preprocess=None, limit: Optional[int] = None,
             split: str = "dev", cache: bool = True) -> SentencePairs:
    """GLUE STS-B dev: 1,500 pairs (`limit`: the first N). `root`: a folder holding dev.tsv."""
    if preprocess is not None:
        raise ConfigError("stsb_dev takes no image preprocessing; the model's tokenizer is applied at evaluation")
    if split not in ("dev", "test", "validation"):
        raise ConfigError(f"stsb_dev split must be 'dev', got {split!r}")
    folder, bundled = _folder(root, STSB_DIR)
    path = folder / STSB_FILE
    fix = (f"put GLUE's STS-B dev.tsv there (bundled in {paths.data_root() / STSB_DIR}; set REX_DATA_ROOT "
           "or pass root=)")
    if not path.is_file():
        raise DatasetError(f"STS-B file {path} does not exist; {fix}")
    if bundled and _sha256(path) != STSB_SHA256:
        raise DatasetError(f"{path} has sha256 {_sha256(path)[:16]}..., expected {STSB_SHA256[:16]}... "
                           f"(../shared/data/README.md): the file is truncated or modified; {fix}")
    pairs = read_stsb(path)
    if bundled and len(pairs) != STSB_PAIRS:
        raise DatasetError(f"{path} holds {len(pairs)} pairs, expected {STSB_PAIRS}; {fix}")
    if limit is not None:
        if int(limit) <= 0:
            raise ConfigError(f"limit must be a positive number of pairs, got {limit}")
        pairs = pairs[: int(limit)]
    return SentencePairs(pairs, path)


# ------------------------------------------------------------------------------------------ WikiText-2

@dataclass
class TextCorpus:
    """A raw text (LF line ends) with a token budget; `windows(tokenizer, L)` gives the scored windows."""

    text: str
    tokens: int = DEFAULT_TOKENS
    window: int = DEFAULT_WINDOW
    path: Optional[Path] = None
    name: str = "wikitext2_test"

    def __len__(self) -> int:  # number of windows (for code that sizes a dataset by len)
        return max(1, self.tokens // self.window)

    def token_ids(self, tokenizer, n: int) -> torch.Tensor:
        """The first `n` token ids of the text, identical to those of tokenizing the whole text (no special
        tokens). Tokenizes growing prefixes cut at a line end, keeping a margin of tokens so that a token
        spanning the cut is never used."""
        margin = 64
        chars = max(4096, 8 * (n + margin))
        while True:
            if chars >= len(self.text):
                prefix = self.text
            else:
                cut = self.text.find("\n", chars)
                prefix = self.text if cut < 0 else self.text[: cut + 1]
            ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
            whole = len(prefix) == len(self.text)
            if len(ids) >= n + margin or whole:
                if len(ids) < n:
                    raise ConfigError(f"the text has only {len(ids)} tokens, fewer than the budget of {n}")
                return torch.tensor(ids[:n], dtype=torch.long)
            chars *= 2

    def windows(self, tokenizer, window: Optional[int] = None, tokens: Optional[int] = None) -> torch.Tensor:
        """LongTensor [tokens // window, window]: consecutive non-overlapping windows from the start."""
        window = int(window or self.window)
        tokens = int(tokens or self.tokens)
        if window < 2:
            raise ConfigError(f"window must be >= 2 tokens, got {window}")
        if tokens < window:
            raise ConfigError(f"token budget {tokens} is smaller than one window of {window} tokens; raise the "
                              f"budget (limit=) or shorten the window")
        n = tokens // window
        return self.token_ids(tokenizer, n * window).view(n, window)


def wikitext2(split: str = "test", root: Optional[os.PathLike] = None, tokens: int = DEFAULT_TOKENS,
              window: int = DEFAULT_WINDOW) -> TextCorpus:
    """WikiText-2 raw `wiki.<split>.raw`, CRLF converted to LF (the Hugging Face text)."""
    folder, bundled = _folder(root, WIKITEXT_DIR)
    path = folder / f"wiki.{split}.raw"
    fix = (f"put wikitext-2-raw-v1's wiki.{split}.raw there (the test split is bundled in "
           f"{paths.data_root() / WIKITEXT_DIR}; set REX_DATA_ROOT or pass root=)")
    if not path.is_file():
        raise DatasetError(f"WikiText-2 file {path} does not exist; {fix}")
    data = path.read_bytes()
    if bundled and split in WIKITEXT_SHA256:
        if len(data) != WIKITEXT_BYTES[split]:
            raise DatasetError(f"{path} has {len(data):,} bytes, expected {WIKITEXT_BYTES[split]:,}: the file is "
                               f"truncated or modified; {fix}")
        digest = hashlib.sha256(data).hexdigest()
        if digest != WIKITEXT_SHA256[split]:
            raise DatasetError(f"{path} has sha256 {digest[:16]}..., expected {WIKITEXT_SHA256[split][:16]}...: "
                               f"the file is corrupted or modified; {fix}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path} is not UTF-8 text ({exc}); {fix}") from None
    text = text.replace("\r\n", "\n")
    if not text.strip():
        raise DatasetError(f"{path} holds no text; {fix}")
    if int(tokens) <= 0:
        raise ConfigError(f"the token budget must be positive, got {tokens}")
    return TextCorpus(text, int(tokens), int(window), path)


def wikitext2_test(root: Optional[os.PathLike] = None, preprocess=None, limit: Optional[int] = None,
                   split: str = "test", cache: bool = True, window: int = DEFAULT_WINDOW) -> TextCorpus:
    """Registry loader: `limit` is the token budget (default 2,048 = four windows of 512)."""
    if preprocess is not None:
        raise ConfigError("wikitext2_test takes no image preprocessing; the model's tokenizer is applied at "
                          "evaluation")
    return wikitext2(split, root, DEFAULT_TOKENS if limit is None else int(limit), window)
