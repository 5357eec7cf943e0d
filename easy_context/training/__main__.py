"""``python -m easy_context.training COMMAND``:

* ``rope-base``: print the RoPE base for a target context length (used by ``train_scripts/``)::

    python -m easy_context.training rope-base --formula scaling-law --original-base 1e4 \\
        --original-length 4096 --target-length 524288 [--head-dim 128]

* ``prepare``: tokenize a corpus once, ahead of training, into a folder that ``train.py --dataset`` reads::

    python -m easy_context.training prepare --dataset corpus.jsonl --tokenizer TOKENIZER --out DIR
"""

import sys

from .corpus import main as prepare
from .rope import main as rope_base


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["prepare"]:
        return prepare(argv[1:])
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.replace("``", "").strip())
        return 0 if argv else 2
    return rope_base(argv)


if __name__ == "__main__":
    sys.exit(main())
