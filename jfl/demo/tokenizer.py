"""A tiny word-level tokenizer for the shapes demo, with JanusFlow's special tokens.

Pre-tokenization keeps (1) runs of newlines ("\\n", "\\n\\n") as tokens, (2) runs of ASCII
letters/digits as words, (3) every other non-space character (":", ".", "?", ",") as its own
token, and drops spaces. So the chat template's "User: " and "\\n\\n" separators are tokens,
while spacing is not encoded (decode joins tokens with single spaces: the words round-trip,
exact whitespace does not). Special tokens are matched before pre-tokenization.

`encode` prepends BOS (post-processor), never appends EOS; padding is on the left (as Janus's
`batchify`). Read ids by name (`tok.convert_tokens_to_ids(IMAGE_TAG)`), never hard-code them.
"""

import re

from jfl.demo import shapes
from jfl.tokenizer import BOI, BOS, EOI, EOS, PAD, UNK, generation_prompt, understanding_prompt  # noqa: F401
from jfl.tokenizer import IMAGE as IMAGE_TAG
from jfl.tokenizer import UNDERSTANDING_SYSTEM_PROMPT as SYSTEM_PROMPT

BOG = "<｜begin▁of▁generation｜>"  # Janus's image_gen_tag; unused by the demo but reserved
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD, UNK, IMAGE_TAG, BOI, EOI, BOG)
ROLES = ("User", "Assistant")

# Keep in sync with the `tokenizers` Split pattern below (ASCII only).
_PIECE = r"\n+|[A-Za-z0-9]+|[^\sA-Za-z0-9]"
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")


def pieces(text: str) -> list[str]:
  """The pre-tokenized pieces of `text` (special tokens kept whole), as the tokenizer sees them."""
  out = []
  for part in _SPECIAL_RE.split(text):
    out.extend([part] if part in SPECIAL_TOKENS else re.findall(_PIECE, part))
  return out


# ----------------------------------------------------------------------------- vocabulary


def vocab() -> tuple[str, ...]:
  """All tokens, in id order: the special tokens, then the sorted demo words/punctuation."""
  texts = [SYSTEM_PROMPT, *ROLES, ":", "\n", "\n\n", *shapes.all_texts()]
  words = sorted({p for t in texts for p in pieces(t)} - set(SPECIAL_TOKENS))
  return SPECIAL_TOKENS + tuple(words)


VOCAB_SIZE: int = len(vocab())


def vocab_size() -> int:
  """Number of token ids (specials included); < 256 so the tiny config's vocab fits."""
  return VOCAB_SIZE


def build_tokenizer(out_dir: str | None = None):
  """Builds the demo tokenizer; saves it with `save_pretrained(out_dir)` when given.

  Returns a `transformers.PreTrainedTokenizerFast`: BOS prepended by `encode`, `pad_token` set,
  left padding; reload with `AutoTokenizer.from_pretrained(out_dir)`.
  """
  from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  ids = {t: i for i, t in enumerate(vocab())}
  tok = Tokenizer(models.WordLevel(vocab=ids, unk_token=UNK))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(_PIECE), behavior="removed", invert=True)
  tok.add_special_tokens(list(SPECIAL_TOKENS))
  tok.post_processor = processors.TemplateProcessing(
      single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, ids[BOS])])
  fast = PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
      extra_special_tokens=[IMAGE_TAG, BOI, EOI, BOG], add_bos_token=True, add_eos_token=False,
      padding_side="left", clean_up_tokenization_spaces=False)
  if out_dir is not None:
    fast.save_pretrained(out_dir)
  return fast
